#!/usr/bin/env bash
# A real-model check of --save-every: a run killed with kill -9 mid-epoch, then resumed, against the same run
# uninterrupted (both metrics.jsonl and steps.jsonl side by side).
# Default: the CoLA recipe cut to 120 steps, killed at step 100 (checkpoints/last is then the step-80 one), ~8 min:
#   PEFTLAB_DATA=../shared/data bash bench/kill_resume.sh [OUT_DIR]
# Another run: KILL_AT=170 WHOLE=0 OPTIONS="--recipe rotten_tomatoes --save-every 50" bash bench/kill_resume.sh OUT
# (WHOLE=0 skips the uninterrupted run: compare with a run made before.)
set -euo pipefail
out=${1:-runs/kill-resume}
peftlab=${PEFTLAB:-.venv/bin/peftlab}
read -r -a options <<< "${OPTIONS:---recipe cola --max-steps 120 --save-every 40 --report-to tensorboard}"
kill_at=${KILL_AT:-100}
rm -rf "$out" && mkdir -p "$out"
if [ "${WHOLE:-1}" = 1 ]; then
  start=$(date +%s)
  "$peftlab" train "${options[@]}" --output-dir "$out/whole" > "$out/whole.log" 2>&1
  echo "uninterrupted: $(( $(date +%s) - start )) s"
fi
start=$(date +%s)
"$peftlab" train "${options[@]}" --output-dir "$out/killed" > "$out/killed.log" 2>&1 &
pid=$!
until [ -f "$out/killed/steps.jsonl" ] && [ "$(wc -l < "$out/killed/steps.jsonl")" -ge "$kill_at" ]; do sleep 0.5; done
kill -9 "$pid"; wait "$pid" || true
echo "killed at step $(wc -l < "$out/killed/steps.jsonl") after $(( $(date +%s) - start )) s;" \
     "checkpoints/last: $(grep -o '"step", [0-9]*' "$out/killed/checkpoints/last/training_state.json" | head -1)"
start=$(date +%s)
"$peftlab" train --resume "$out/killed" > "$out/resumed.log" 2>&1
echo "resumed: $(( $(date +%s) - start )) s"
grep -a "^Resumed from\|^Test (" "$out/resumed.log" || true
[ -d "$out/whole" ] || exit 0
.venv/bin/python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
lines = lambda run, name: [json.loads(line) for line in (out / run / name).read_text().splitlines()]
metrics = [key for key in ("val_loss", "val_mcc", "val_accuracy", "val_f1", "lr") if key in lines("whole", "metrics.jsonl")[0]]
for whole, killed in zip(lines("whole", "metrics.jsonl"), lines("killed", "metrics.jsonl"), strict=True):
    print(f"step {whole['step']}: " + ", ".join(f"{key} {whole[key]:.6g} vs {killed[key]:.6g}" for key in metrics))
steps = {run: [row["loss"] for row in lines(run, "steps.jsonl")] for run in ("whole", "killed")}
print(f"steps.jsonl: {len(steps['whole'])} vs {len(steps['killed'])} lines; max |train loss difference| "
      f"{max(abs(a - b) for a, b in zip(steps['whole'], steps['killed'])):.2e}")
PY
