"""Seed-compatible entry point of the course scripts: `python run.py gen|LoRA|distil <seed>`.

Each mode runs one workload with sensible defaults on the default model (smollm2-135m, offline) through the
same functions as the `peftlab` command. Extra arguments are passed on, e.g. `python run.py gen 23006 --stream`.
"""

import sys

from peftlab.cli import main

SERENITY_PROMPT = (
    "grant me the serenity to accept the things I cannot change, the courage to change the things I can, "
    "and the wisdom to know the difference."
)
MODES = {
    "gen": lambda seed: ["generate", "--prompt", SERENITY_PROMPT, "--max-new-tokens", "200", "--temperature", "0.8",
                         "--top-k", "200", "--top-p", "0.95", "--seed", seed],
    # peftlab's CoLA recipe on the default model (README, "LoRA on CoLA"); the run directory is named by the seed.
    "LoRA": lambda seed: ["train", "--task", "cola", "--model", "smollm2-135m", "--method", "lora",
                          "--targets", "all-linear", "--rank", "16", "--alpha", "32", "--lora-dropout", "0.1",
                          "--epochs", "3", "--batch-size", "32", "--lr", "5e-4", "--seed", seed,
                          "--output-dir", f"runs/LoRA-{seed}"],
}
PLANNED = {"distil": "distillation into an RNN (W2)"}


def run(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[1].lstrip("-").isdigit():
        print(f"usage: python run.py {{{'|'.join([*MODES, *PLANNED])}}} SEED [extra peftlab options]", file=sys.stderr)
        return 2
    mode, seed, extra = argv[0], argv[1], argv[2:]
    if mode in PLANNED:
        print(f"run.py {mode}: {PLANNED[mode]} is not implemented yet in this version of peftlab", file=sys.stderr)
        return 2
    if mode not in MODES:
        print(f"run.py: unknown mode '{mode}': expected one of {', '.join([*MODES, *PLANNED])}", file=sys.stderr)
        return 2
    return main(MODES[mode](seed) + extra)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
