#!/bin/sh
# liveavatar-plan's command line: the decision (exit 0), a refusal (exit 1, the message), --json, --table, a
# checkpoint folder whose config.json alone is read, and argument errors (exit 2 with a message).
# usage: plan_tool_test.sh LIVEAVATAR_PLAN
set -u
tool=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

"$tool" --devices 4x24GB >"$tmp/out" 2>&1 || fail "4x24GB should fit: $(cat "$tmp/out")"
grep -q "^stage:4, bf16 weights, bf16 KV, 704x384: fits" "$tmp/out" || fail "4x24GB decision: $(cat "$tmp/out")"
grep -q "^cuda:3 *stage 3/4 (layers 30-39)" "$tmp/out" || fail "4x24GB breakdown: $(cat "$tmp/out")"

"$tool" --devices 1x80GB >"$tmp/out" 2>&1
[ $? -eq 1 ] || fail "1x80GB bf16 should be refused with exit status 1"
grep -q "^needs .* GiB on cuda:0, 79.5 free (single, bf16 weights, bf16 KV, 704x384); fits with precision=fp8 or kv-precision=fp8" \
  "$tmp/out" || fail "refusal message: $(cat "$tmp/out")"

"$tool" --devices 5x80GB --json >"$tmp/json" || fail "5x80GB --json"
python3 - "$tmp/json" <<'PY' || fail "5x80GB JSON: $(cat "$tmp/json")"
import json, sys
d = json.load(open(sys.argv[1]))
assert d["fits"] and d["plan"]["parallel"] == "step", d["message"]
assert d["parameters"] == 16295755609
assert d["tokens"] == {"frame": 1056, "block": 3168, "ring": 12672, "sink": 2640, "text": 512}
assert d["plan"]["devices"][4]["role"] == "aux"
assert all(x["total_bytes"] <= x["free_bytes"] for x in d["plan"]["devices"])
PY

"$tool" --devices 4x24GB --table >"$tmp/table" || fail "--table"
grep -q "^stage:4 *fp8 *bf16 " "$tmp/table" || fail "table rows: $(cat "$tmp/table")"
[ "$(grep -c '^single\|^step\|^stage' "$tmp/table")" -eq 25 ] || fail "5 plans x 5 precisions: $(cat "$tmp/table")"
"$tool" --devices 4x24GB --table --json | python3 -c 'import json,sys; assert len(json.load(sys.stdin)["table"]) == 25' \
  || fail "--table --json"

# A checkpoint folder: only config.json is read (the shard named by the index is a directory, not a file).
mkdir -p "$tmp/ckpt/diffusion_pytorch_model-00001-of-00001.safetensors"
echo '{"dim": 5120, "num_heads": 40, "num_layers": 40}' >"$tmp/ckpt/config.json"
"$tool" --checkpoint "$tmp/ckpt" --devices cuda:0=22GiB >"$tmp/out" 2>&1
[ $? -eq 1 ] || fail "22 GiB for the 14B model should be refused"
grep -q "^needs .* on cuda:0, 22.0 free" "$tmp/out" || fail "checkpoint refusal: $(cat "$tmp/out")"
echo '{"dim": 64, "num_heads": 4, "num_layers": 2, "ffn_dim": 128, "audio_inject_layers": [0, 1]}' >"$tmp/ckpt/config.json"
"$tool" --checkpoint "$tmp/ckpt" --devices cpu=8GiB --size 128x64 --precision fp32 >"$tmp/out" 2>&1 \
  || fail "tiny checkpoint on 8 GiB: $(cat "$tmp/out")"

expect_error() {  # expect_error "message fragment" args...
  fragment=$1; shift
  "$tool" "$@" >"$tmp/out" 2>&1
  rc=$?
  [ $rc -eq 2 ] || fail "$* should exit with status 2, got $rc"
  grep -q -e "$fragment" "$tmp/out" || fail "$*: expected '$fragment' in: $(cat "$tmp/out")"
}
expect_error "unknown argument '--gpus'" --gpus 4
expect_error "precision must be fp32, bf16 or fp8" --precision int4
expect_error "height and width must be positive multiples of 64" --size 720x384
expect_error "expects HEIGHTxWIDTH" --size 704
expect_error "a device preset is NxSGB" --devices 4x24
expect_error "parallel=step needs one device per denoising step" --devices 2x80GB --parallel step
expect_error "cannot open the model config" --checkpoint "$tmp/absent"
expect_error "--devices needs a value" --devices
echo "liveavatar-plan: all checks passed"
