#!/usr/bin/env bash
# Times the command a user runs, `tinylm train recipes/shakespeare.toml`, from a cold start: interpreter
# start-up, tokenizer training and data preparation included (nothing prepared, no earlier run), then prints the
# validation bits per byte of every evaluation. Target on 2 CPU cores: at or below 2.15 bits per byte within
# 120 s of wall time, with no rise in validation loss at the end.
# A second argument names another text to run the same recipe on, unchanged but for its path (for example the
# two that scripts/package_texts.py writes), so that the recipe is seen on text it was not tuned on.
set -euo pipefail
PYTHON=${1:-python3}
TEXT=${2:-../shared/data/tinyshakespeare.txt}
if [ ! -f "$TEXT" ]; then
    echo "bench shakespeare: skipped, $TEXT is absent"
    exit 0
fi
OUT=runs/bench-$(basename "$TEXT" .txt)
rm -rf "$OUT"
start=$(date +%s.%N)
"$PYTHON" -m tinylm train recipes/shakespeare.toml --backend torch --quiet --out "$OUT/run" --set "data.dir=$OUT/data" \
    --set "data.sources.text.path=$TEXT"
end=$(date +%s.%N)
"$PYTHON" - "$OUT/run/metrics.jsonl" "$start" "$end" "$TEXT" <<'PY'
import json, os, sys

rows = [json.loads(line) for line in open(sys.argv[1])]
evals = [(r["step"], r["val_bpb"]) for r in rows if "val_bpb" in r]
wall = float(sys.argv[3]) - float(sys.argv[2])
print(f"bench shakespeare: {os.path.basename(sys.argv[4])}, {os.path.getsize(sys.argv[4]):,} bytes")
print("bench shakespeare: val bpb " + ", ".join(f"{bpb:.3f} (step {s})" for s, bpb in evals))
best = min(bpb for _, bpb in evals)
print(f"bench shakespeare: {wall:.1f} s wall from a cold start, final {evals[-1][1]:.3f} bits per byte "
      f"(best {best:.3f}); target <= 2.15 within 120 s")
PY
