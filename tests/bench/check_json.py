#!/usr/bin/env python3
"""Runs a benchmark command and checks that it printed one JSON object with the given keys (a smoke run: the
figures themselves are reported, not asserted; speed targets are judged from full runs named in the docs)."""
import json
import subprocess
import sys

keys = [k for k in sys.argv[1].split(",") if k]
cmd = sys.argv[2:]
out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
lines = [l for l in out.splitlines() if l.strip().startswith("{")]
if not lines:
    sys.exit(f"FAIL: {cmd[0]} printed no JSON:\n{out}")
data = json.loads(lines[-1])
missing = [k for k in keys if k not in data]
if missing:
    sys.exit(f"FAIL: {cmd[0]} JSON lacks {missing}: {data}")
print(json.dumps(data))
