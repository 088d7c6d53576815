"""Synthetic datasets in the original file formats (seconds to write, deterministic by seed); no peftlab import, so
tests/legacy_runs/make_runs.py can write the same data under an older peftlab."""

from __future__ import annotations

import random

COLA_WORDS = ["the", "cat", "dog", "sat", "ran", "on", "mat", "quickly", "big", "small", "a", "house"]


def write_cola(directory, train_rows: int = 96, dev_rows: int = 40, seed: int = 0) -> str:
    """Synthetic CoLA files in the original format; label 1 when the sentence contains 'cat'."""
    generator = random.Random(seed)
    cola = directory / "cola"
    cola.mkdir(parents=True, exist_ok=True)
    for name, rows in (("in_domain_train.tsv", train_rows), ("in_domain_dev.tsv", dev_rows)):
        lines = []
        for _ in range(rows):
            sentence = " ".join(generator.choice(COLA_WORDS) for _ in range(generator.randint(2, 12)))
            label = int("cat" in sentence.split())
            lines.append(f"src\t{label}\t{'' if label else '*'}\t{sentence}.\n")
        (cola / name).write_text("".join(lines), encoding="utf-8")
    return str(directory)


REVIEW_WORDS = ["the", "film", "is", "a", "movie", "plot", "story", "with"]


def write_rotten_tomatoes(directory, lines_per_class: int = 5331, seed: int = 0) -> str:
    """Synthetic polarity files in the original single-byte format; positives say 'great', negatives 'awful'."""
    generator = random.Random(seed)
    folder = directory / "rotten_tomatoes"
    folder.mkdir(parents=True, exist_ok=True)
    for name, word in (("rt-polarity.pos", "great"), ("rt-polarity.neg", "awful")):
        lines = [" ".join(generator.choice(REVIEW_WORDS) for _ in range(generator.randint(1, 5))) + f" {word} ."
                 for _ in range(lines_per_class)]
        (folder / name).write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return str(directory)
