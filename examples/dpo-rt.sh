#!/usr/bin/env bash
# The DPO paper's controlled-sentiment experiment on Rotten Tomatoes (SPEC W7), on SmolLM2-135M, in five commands:
# a reward run, a short SFT of the policy on reviews as plain text, preference pairs sampled from the SFT policy and
# scored by the reward run, DPO over a β grid from the SFT run (its adapter is the reference), and the reward–KL
# frontier against the SFT policy and best-of-N sampling. Budget on a 2-core CPU: see README, "DPO (W7)".
set -euo pipefail
peftlab train --task rotten_tomatoes --objective classification --method lora --targets all-linear --rank 16 \
  --alpha 32 --lr 3e-4 --schedule cosine --epochs 1 --batch-size 16 --train-limit 2400 --eval-limit 200 \
  --test-limit 400 --output-dir runs/dpo/reward
peftlab train --task rotten_tomatoes --objective lm --method lora --targets all-linear --rank 16 --alpha 32 \
  --lora-dropout 0 --lr 3e-4 --schedule cosine --epochs 1 --batch-size 16 --train-limit 2400 --eval-limit 200 \
  --test-limit 200 --output-dir runs/dpo/sft
peftlab preferences --policy runs/dpo/sft --reward runs/dpo/reward --prompts 256 --samples 4 --max-new-tokens 24 \
  --output runs/dpo/pairs.jsonl
peftlab sweep examples/sweep-dpo.yaml
peftlab frontier --reward runs/dpo/reward --runs runs/dpo/sweep --prompts 32 --samples 4 --max-new-tokens 24 \
  --output-dir runs/dpo/frontier
# More pairs (results: README, "DPO (W7)"): twice the prompts, the same SFT policy and reward run, clear pairs only,
# one epoch (75 steps of 16 pairs) per beta, then the frontier of both:
#   peftlab preferences --policy runs/dpo/sft --reward runs/dpo/reward --prompts 512 --samples 4 \
#     --max-new-tokens 24 --output runs/dpo/pairs-512.jsonl
#   for beta in 0.5 1.0; do peftlab train --objective dpo --preferences runs/dpo/pairs-512.jsonl \
#     --min-score-gap 0.3 --init-from runs/dpo/sft --method lora --targets all-linear --rank 16 --alpha 32 \
#     --lora-dropout 0 --lr 2e-4 --batch-size 16 --warmup-ratio 0.1 --epochs 1 --beta $beta \
#     --output-dir runs/dpo/more-pairs/beta$beta; done
#   PEFTLAB_DATA=../shared/data peftlab frontier --reward runs/dpo/reward --runs runs/dpo/more-pairs \
#     --prompts 32 --samples 4 --max-new-tokens 24 --output-dir runs/dpo/frontier-more
# Truncation marks (results: README, "DPO (W7)"): the same 256 prompts' pairs, now with chosen_truncated /
# rejected_truncated (the preferences command above writes them), so no EOS is trained after a cut completion;
# clear pairs, beta 0.5 and 1, then their frontier:
#   peftlab preferences --policy runs/dpo/sft --reward runs/dpo/reward --prompts 256 --samples 4 \
#     --max-new-tokens 24 --output runs/dpo/pairs-ends.jsonl
#   for beta in 0.5 1.0; do peftlab train --objective dpo --preferences runs/dpo/pairs-ends.jsonl \
#     --min-score-gap 0.3 --init-from runs/dpo/sft --method lora --targets all-linear --rank 16 --alpha 32 \
#     --lora-dropout 0 --lr 2e-4 --batch-size 16 --warmup-ratio 0.1 --epochs 1 --beta $beta \
#     --output-dir runs/dpo/ends/beta$beta; done
#   PEFTLAB_DATA=../shared/data peftlab frontier --reward runs/dpo/reward --runs runs/dpo/ends \
#     --prompts 32 --samples 4 --max-new-tokens 24 --output-dir runs/dpo/frontier-ends
