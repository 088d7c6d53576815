#!/usr/bin/env bash
# E0 270 Assignment 2 (docs/course.md): Problem 0 (generation), the parameter counts of Problem 1 on GPT-2 small and
# medium, Problem 1 (LoRA on CoLA with the course's settings: rank 4, alpha 64, every linear layer, LayerNorms and
# head trainable, lr 1e-3) and Problem 2 (distillation into an LSTM, with and without KD, students of equal size),
# then one HTML page. Budget for a 2-core CPU (~20 min): CoLA on 2,048 evenly spaced training sentences for 3 epochs
# of batch 32, evaluated on the whole dev set every 32 steps; the students on the same 2,048 sentences (the teacher's).
# Usage: bash examples/course/e0270.sh [OUTPUT_FOLDER]   (default runs/course/e0270; PEFTLAB_DATA must be set)
set -euo pipefail
out=${1:-runs/course/e0270}
peftlab=${PEFTLAB:-peftlab}
mkdir -p "$out"
# Problem 0: the course's prompt and sampling settings (run.py gen 23006 is the same command).
$peftlab generate --prompt "grant me the serenity to accept the things I cannot change, the courage to change the \
things I can, and the wisdom to know the difference." --max-new-tokens 200 --temperature 0.8 --top-k 200 \
  --top-p 0.95 --seed 23006 > "$out/generation.txt"
# Problem 1's parameter counts: the course's LoRA (rank 4 on every block linear, LayerNorms and head trainable).
for model in gpt2 gpt2-medium; do
  $peftlab train --task cola --model $model --init random --method lora --rank 4 --alpha 64 --targets all-linear \
    --extra-trainable head,norms --dry-run --output-dir "$out/dry-run-$model" > "$out/parameters-$model.txt"
done
# Problem 1: LoRA on CoLA, per-epoch loss, accuracy and MCC curves (plots/ of the run).
$peftlab train --task cola --method lora --rank 4 --alpha 64 --targets all-linear --extra-trainable head,norms \
  --lr 1e-3 --epochs 3 --batch-size 32 --train-limit 2048 --eval-every 32 --seed 0 --output-dir "$out/cola-lora"
# Problem 2: KD (alpha 0.5, T 2) and no-KD (alpha 0) LSTM students of the same size, 3 seeds each.
$peftlab distill --teacher "$out/cola-lora" --compare --seeds 3 --alpha 0.5 --temperature 2 \
  --output-dir "$out/distill"
$peftlab report "$out/cola-lora" "$out/distill" --html "$out/e0270.html"
