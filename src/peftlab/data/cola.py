"""CoLA (Corpus of Linguistic Acceptability), raw public release: 4 tab-separated columns, no header.

Columns: source code (e.g. gj04), label (1 = acceptable, 0 = unacceptable), the original author's mark
(usually empty), sentence. Splits: train = in_domain_train.tsv, validation = in_domain_dev.tsv, and
validation_ood = out_of_domain_dev.tsv when that official file is present.
"""

from __future__ import annotations

import os

from peftlab.data import LabelledText, require_file, resolve_data_dir
from peftlab.errors import PeftlabError
from peftlab.fileio import read_text

SPLIT_FILES = {"train": "in_domain_train.tsv", "validation": "in_domain_dev.tsv", "validation_ood": "out_of_domain_dev.tsv"}
LABEL_NAMES = ("unacceptable", "acceptable")


def present_splits(data_dir: str | os.PathLike | None = None) -> list[str]:
    """The splits whose file is in the data directory."""
    folder = resolve_data_dir(data_dir, "cola")
    return [split for split, name in SPLIT_FILES.items() if (folder / name).is_file()]


def read_cola(split: str, data_dir: str | os.PathLike | None = None) -> list[LabelledText]:
    """Read one CoLA split; any malformed line is an error naming file:line."""
    if split not in SPLIT_FILES:
        raise PeftlabError(f"unknown CoLA split '{split}': expected one of {', '.join(SPLIT_FILES)}")
    path = require_file(resolve_data_dir(data_dir, "cola") / SPLIT_FILES[split], f"CoLA {split} split")
    examples = []
    text = read_text(path, f"CoLA {split} file")
    lines = text.removesuffix("\n").split("\n") if text else []  # numbered as editors do: by \n
    for line_number, line in enumerate(lines, start=1):
        line = line.removesuffix("\r")
        origin = f"{path}:{line_number}"
        columns = line.split("\t")
        if len(columns) != 4:
            raise PeftlabError(
                f"{origin}: expected 4 tab-separated columns (source, label, mark, sentence), found {len(columns)}"
            )
        label, sentence = columns[1], columns[3].strip()
        if label not in ("0", "1"):
            raise PeftlabError(f"{origin}: label must be 0 or 1, found {label!r}")
        if not sentence:
            raise PeftlabError(f"{origin}: empty sentence")
        examples.append(LabelledText(sentence, int(label), origin))
    if not examples:
        raise PeftlabError(f"{path}: no examples (empty file)")
    return examples
