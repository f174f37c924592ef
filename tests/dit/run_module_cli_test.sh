#!/bin/sh
# liveavatar-run-module end to end: a module on the fixture weights writes its outputs; bad input fails with exit 1.
# usage: run_module_cli_test.sh <liveavatar-run-module> <fixtures dir>
set -eu
tool="$1"; fixtures="$2"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
"$tool" --module schedule --tiny --output "$tmp/schedule.safetensors"
test -s "$tmp/schedule.safetensors"
# The sampler fixture has no tensor named 'context': text_embedding must refuse it and name the missing input.
if "$tool" --module text_embedding --weights "$fixtures" --inputs "$fixtures/sampler.safetensors" \
     --output "$tmp/x.safetensors" 2>"$tmp/err"; then
  echo "expected a failure for a missing input"; exit 1
fi
grep -q "'context'" "$tmp/err"
if "$tool" --module no_such_module --tiny --output "$tmp/y.safetensors" 2>"$tmp/err2"; then
  echo "expected a failure for an unknown module"; exit 1
fi
grep -q "unknown module" "$tmp/err2"
echo ok
