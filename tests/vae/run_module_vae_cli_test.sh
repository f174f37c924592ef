#!/bin/sh
# liveavatar-run-module, VAE modules end to end: the tiny fixture VAE (dim read from the .pth) decodes the fixture's
# latents; a missing input and a bad size fail with exit 1 and a message naming them.
# usage: run_module_vae_cli_test.sh <liveavatar-run-module> <fixtures dir>
set -eu
tool="$1"; fixtures="$2"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# vae_io.safetensors has no tensor named 'video': vae_encode must refuse it and name the input.
if "$tool" --module vae_encode --weights "$fixtures" --inputs "$fixtures/vae_io.safetensors" \
     --output "$tmp/x.safetensors" 2>"$tmp/err"; then
  echo "expected a failure for a missing input"; exit 1
fi
grep -q "'video'" "$tmp/err"
# Its 'ref_pixels' ([1, 3, 1, 32, 64]) decoded as latents has 3 channels, not 16.
if "$tool" --module vae_stream_decode --weights "$fixtures/Wan2.1_VAE.pth" --inputs "$fixtures/vae_io.safetensors" \
     --output "$tmp/y.safetensors" 2>"$tmp/err2"; then
  echo "expected a failure for missing latents"; exit 1
fi
grep -q "latents" "$tmp/err2"
"$tool" --help | grep -q vae_stream_decode
echo ok
