"""Rotten Tomatoes sentence polarity (Pang & Lee 2005, v1.0): `rt-polarity.pos` / `rt-polarity.neg`.

One lower-cased, tokenized snippet per line in a single-byte encoding. Lines are decoded as cp1252 (the bytes
0x85/0x91/0x96/0x97 in the files are cp1252 punctuation: … ‘ – —), falling back to latin-1 for a line cp1252
cannot decode, so no byte is ever lost.

The release has no official split. This one is deterministic and balanced: each class's lines are shuffled
with `random.Random(SPLIT_SEED)` and cut into 4265 / 533 / 533 (train / validation / test), the sizes of the
Hugging Face `rotten_tomatoes` dataset (8530 / 1066 / 1066 in all). A split lists its positive then its
negative examples, each in file order.
"""

from __future__ import annotations

import os
import random

from peftlab.data import LabelledText, require_file, resolve_data_dir
from peftlab.errors import PeftlabError

FILES = {1: "rt-polarity.pos", 0: "rt-polarity.neg"}
LABEL_NAMES = ("negative", "positive")
SPLIT_SIZES = {"train": 4265, "validation": 533, "test": 533}  # per class
SPLIT_SEED = 2005


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("cp1252")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def read_polarity_file(path) -> list[LabelledText]:
    """Every snippet of one polarity file, label unset (-1); an empty line is an error naming file:line."""
    lines = path.read_bytes().splitlines()
    examples = []
    for line_number, raw in enumerate(lines, start=1):
        text = _decode(raw).strip()
        if not text:
            raise PeftlabError(f"{path}:{line_number}: empty line (one snippet per line expected)")
        examples.append(LabelledText(text, -1, f"{path}:{line_number}"))
    if not examples:
        raise PeftlabError(f"{path}: no examples (empty file)")
    return examples


def present_splits(data_dir: str | os.PathLike | None = None) -> list[str]:
    """Every split when both polarity files are in the data directory (the splits are cut from them)."""
    folder = resolve_data_dir(data_dir, "rotten_tomatoes")
    return list(SPLIT_SIZES) if all((folder / name).is_file() for name in FILES.values()) else []


def read_rotten_tomatoes(split: str, data_dir: str | os.PathLike | None = None) -> list[LabelledText]:
    """One split (train, validation or test) of the deterministic balanced split described above."""
    if split not in SPLIT_SIZES:
        raise PeftlabError(f"unknown Rotten Tomatoes split '{split}': expected one of {', '.join(SPLIT_SIZES)}")
    folder = resolve_data_dir(data_dir, "rotten_tomatoes")
    needed = sum(SPLIT_SIZES.values())
    examples = []
    for label in (1, 0):
        path = require_file(folder / FILES[label], f"Rotten Tomatoes {LABEL_NAMES[label]} file")
        snippets = read_polarity_file(path)
        if len(snippets) < needed:
            raise PeftlabError(f"{path}: {len(snippets)} snippets, the split needs {needed} per class")
        order = list(range(len(snippets)))
        random.Random(SPLIT_SEED).shuffle(order)
        start = 0
        for name, size in SPLIT_SIZES.items():
            if name == split:
                chosen = sorted(order[start : start + size])
                examples += [LabelledText(snippets[i].text, label, snippets[i].origin) for i in chosen]
            start += size
    return examples
