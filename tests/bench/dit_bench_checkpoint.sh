#!/usr/bin/env bash
# The DiT bench on a checkpoint made by `liveavatar-checkpoint make-tiny`: loads it by key name and reports the
# resident memory the load added next to the checkpoint size (figures printed, not asserted).
set -euo pipefail
checkpoint_tool=$1 dit_bench=$2 check_json=$3
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
"$checkpoint_tool" make-tiny "$tmp" > /dev/null
python3 "$check_json" checkpoint_mib,load_rss_anon_growth_mib,block_mean_s \
  "$dit_bench" --checkpoint "$tmp/Wan2.2-S2V-14B" --blocks 2
