#!/usr/bin/env bash
# A real-model check of --save-every: the CoLA recipe cut to 120 steps, once uninterrupted and once killed with
# kill -9 at step 100 (its checkpoints/last is then the step-80 one), resumed; then both metrics.jsonl side by side.
# Usage: PEFTLAB_DATA=../shared/data bash bench/kill_resume.sh [OUT_DIR]   (~13 min on 2 CPU cores)
set -euo pipefail
out=${1:-runs/kill-resume}
peftlab=${PEFTLAB:-.venv/bin/peftlab}
options=(--recipe cola --max-steps 120 --save-every 40 --report-to tensorboard)
rm -rf "$out" && mkdir -p "$out"
start=$(date +%s)
"$peftlab" train "${options[@]}" --output-dir "$out/whole" > "$out/whole.log" 2>&1
echo "uninterrupted: $(( $(date +%s) - start )) s"
start=$(date +%s)
"$peftlab" train "${options[@]}" --output-dir "$out/killed" > "$out/killed.log" 2>&1 &
pid=$!
until [ -f "$out/killed/steps.jsonl" ] && [ "$(wc -l < "$out/killed/steps.jsonl")" -ge 100 ]; do sleep 0.5; done
kill -9 "$pid"; wait "$pid" || true
echo "killed at step $(wc -l < "$out/killed/steps.jsonl") after $(( $(date +%s) - start )) s;" \
     "checkpoints/last: $(grep -o '"batches_done", [0-9]*' "$out/killed/checkpoints/last/training_state.json" || true)"
start=$(date +%s)
"$peftlab" train --resume "$out/killed" > "$out/resumed.log" 2>&1
echo "resumed: $(( $(date +%s) - start )) s"
.venv/bin/python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {name: [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()] for name in ("whole", "killed")}
for whole, killed in zip(rows["whole"], rows["killed"], strict=True):
    print(f"step {whole['step']}: val_loss {whole['val_loss']:.6f} vs {killed['val_loss']:.6f}, "
          f"val_mcc {whole['val_mcc']:.4f} vs {killed['val_mcc']:.4f}, lr {whole['lr']:.3e} vs {killed['lr']:.3e}")
steps = {name: [json.loads(line)["loss"] for line in (out / name / "steps.jsonl").read_text().splitlines()] for name in rows}
print(f"steps.jsonl: {len(steps['whole'])} vs {len(steps['killed'])} lines; max |train loss difference| "
      f"{max(abs(a - b) for a, b in zip(steps['whole'], steps['killed'])):.2e}")
PY
