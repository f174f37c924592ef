#!/bin/sh
# make-tiny + inspect round trip through the command line; a broken set must make inspect fail.
set -eu
tool="$1"
dir=$(mktemp -d "${TMPDIR:-/tmp}/checkpoint-cli-XXXXXX")
trap 'rm -rf "$dir"' EXIT
"$tool" make-tiny "$dir" --seed 5 --shards 2
"$tool" inspect "$dir" > "$dir/report.txt"
grep -q '^valid$' "$dir/report.txt"
grep -q '^dit      OK' "$dir/report.txt"
# Remove one shard: inspect must report it and exit non-zero.
rm "$dir/Wan2.2-S2V-14B/diffusion_pytorch_model-00002-of-00002.safetensors"
if "$tool" inspect "$dir" > "$dir/report2.txt"; then echo "inspect accepted a set with a missing shard"; exit 1; fi
grep -q 'missing' "$dir/report2.txt"
# Usage errors exit 2.
if "$tool" frobnicate "$dir" 2>/dev/null; then exit 1; fi
echo "checkpoint-cli: ok"
