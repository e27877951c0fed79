#!/bin/bash
# Train the seven trained rows of one (profile, dataset, seed) at the same time on one GPU, and
# pack their run folders into one archive for the run cache of another machine.
#
#   bash benchmarks/gpu_rows.sh PROFILE DATASET SEED OUT [BUDGET_S] [EARLIER.tar.gz]
#
# The rows are small (one SASRec at batch 256 uses a sliver of a large GPU), so seven processes
# share the card. Each is `fmpaper row`, i.e. the ordinary cached, resumable training: a run
# stopped by BUDGET_S (default 540 s) keeps its last finished epoch in `<row>-<hash>.partial/`,
# and passing the archive of that call back as EARLIER.tar.gz resumes it there. Nothing is
# downloaded: the dataset is read from data/<dataset>.inter.gz beside this repository's root
# (gzip of ~/.cache/fmpaper/data/<dataset>.inter; a machine without internet cannot fetch it)
# or, failing that, from the usual cache.
#
# Writes to OUT: runs.tar.gz (the run folders, relative to the runs root; unpack into
# ~/.cache/fmpaper/runs to use them), summary.json (per row: finished or not, epochs, seconds per
# epoch, validation NDCG@10, device) and one log per row. Test it anywhere with the smoke profile:
#   bash benchmarks/gpu_rows.sh smoke ml-100k 0 /tmp/gpu-smoke 120
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: bash benchmarks/gpu_rows.sh PROFILE DATASET SEED OUT [BUDGET_S] [EARLIER.tar.gz]" >&2
  exit 2
fi
PROFILE=$1 DATASET=$2 SEED=$3 OUT=$4 BUDGET=${5:-540} EARLIER=${6:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT" "$WORK/runs"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" FMPAPER_RUNS="$WORK/runs" OMP_NUM_THREADS=${THREADS:-2}

if [ -f "$ROOT/data/$DATASET.inter.gz" ]; then
  export FMPAPER_CACHE="$WORK/cache"
  mkdir -p "$FMPAPER_CACHE/data"
  gunzip -c "$ROOT/data/$DATASET.inter.gz" > "$FMPAPER_CACHE/data/$DATASET.inter"
fi
if [ -n "$EARLIER" ]; then
  tar -xzf "$EARLIER" -C "$WORK/runs"
fi

ROWS=$("$PY" -c "from fmpaper.rows import trained; print(' '.join(trained()))")
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu',
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
"$PY" -m fmpaper.cli data stats "$DATASET" > /dev/null   # one clear line if the data is missing
start=$(date +%s)
for r in $ROWS; do
  # SIGINT first: the training stops between steps; the last finished epoch is on disk already
  timeout -s INT -k 30 "$BUDGET" "$PY" -m fmpaper.cli row "$r" --profile "$PROFILE" --dataset "$DATASET" \
    --seed "$SEED" --quiet > "$OUT/$r.log" 2>&1 &
done
wait || true
echo "wall time $(( $(date +%s) - start )) s for: $ROWS"

"$PY" - "$WORK/runs" "$OUT/summary.json" <<'EOF'
import json, sys
from pathlib import Path
summary = {}
for d in sorted(Path(sys.argv[1]).glob("*/*/s*/*")):
    done = not d.name.endswith(".partial")
    # a finished run keeps its epochs in history.json, a training in progress in state.json
    history_file = d / ("history.json" if done else "state.json")
    if not history_file.exists():
        continue
    history = json.loads(history_file.read_text())
    history = history if done else history["history"]
    metrics = json.loads((d / "metrics.json").read_text()) if done else {}
    summary[d.name] = {
        "finished": done, "epochs": len(history),
        "seconds_per_epoch": [round(h["seconds"], 1) for h in history],
        "valid_ndcg@10": [round(h["valid_ndcg@10"], 5) for h in history],
        "hardware": metrics.get("hardware"),
    }
Path(sys.argv[2]).write_text(json.dumps(summary, indent=1))
print(json.dumps({k: (v["finished"], v["epochs"]) for k, v in summary.items()}))
EOF
tar -czf "$OUT/runs.tar.gz" -C "$WORK/runs" .
ls -l "$OUT/runs.tar.gz"
