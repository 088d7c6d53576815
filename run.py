"""Seed-compatible entry point of the course scripts: `python run.py gen|LoRA|distil <seed>`.

Each mode runs one workload with sensible defaults on the default model (smollm2-135m, offline) through the
same functions as the `peftlab` command. Extra arguments are passed on, e.g. `python run.py gen 23006 --stream`
or `python run.py distil 23006 --teacher runs/X --augment 4`.
"""

import argparse
import sys
from pathlib import Path

try:
    from peftlab.cli import main
except ModuleNotFoundError as missing:  # a Python without peftlab's environment: say which one to use
    print(f"run.py: this Python ({sys.executable}) cannot import {missing.name}, so peftlab is not installed in it. "
          f"Fix: run it with the project's environment: `make setup` once, then `.venv/bin/python run.py "
          f"{' '.join(sys.argv[1:]) or 'gen 23006'}` (or activate .venv, or `pip install -e .` into this Python)",
          file=sys.stderr)
    sys.exit(2)

SERENITY_PROMPT = (
    "grant me the serenity to accept the things I cannot change, the courage to change the things I can, "
    "and the wisdom to know the difference."
)
MODES = {
    "gen": lambda seed: ["generate", "--prompt", SERENITY_PROMPT, "--max-new-tokens", "200", "--temperature", "0.8",
                         "--top-k", "200", "--top-p", "0.95", "--seed", seed],
    # peftlab's CoLA recipe (`peftlab recipes`; README, "LoRA on CoLA"); the run directory is named by the seed.
    "LoRA": lambda seed: ["train", "--recipe", "cola", "--seed", seed, "--output-dir", f"runs/LoRA-{seed}"],
}


def distil(seed: str, extra: list[str]) -> int:
    """Distil a CoLA teacher into an LSTM student: the teacher of `--teacher RUN_DIR`, else runs/LoRA-<seed>,
    trained first (the LoRA recipe) unless it is there already. Other extra options go to `peftlab distill`."""
    options = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    options.add_argument("--teacher")
    known, extra = options.parse_known_args(extra)
    teacher = known.teacher
    if teacher is None:
        teacher = f"runs/LoRA-{seed}"
        if not (Path(teacher) / "summary.json").is_file():
            code = main(MODES["LoRA"](seed))
            if code:
                return code
    return main(["distill", "--teacher", teacher, "--student", "lstm", "--epochs", "10", "--seed", seed,
                 "--output-dir", f"runs/distil-{seed}"] + extra)


def run(argv: list[str]) -> int:
    modes = [*MODES, "distil"]
    if len(argv) < 2 or not argv[1].lstrip("-").isdigit():
        print(f"usage: python run.py {{{'|'.join(modes)}}} SEED [extra peftlab options]", file=sys.stderr)
        return 2
    mode, seed, extra = argv[0], argv[1], argv[2:]
    if mode == "distil":
        return distil(seed, extra)
    if mode not in MODES:
        print(f"run.py: unknown mode '{mode}': expected one of {', '.join(modes)}", file=sys.stderr)
        return 2
    return main(MODES[mode](seed) + extra)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
