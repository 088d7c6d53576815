"""Preference pairs for DPO: JSONL, one object per line with "prompt", "chosen" and "rejected" (strings) and
optionally "chosen_score" and "rejected_score" (numbers, e.g. a reward model's; kept, not trained on) and
"chosen_truncated" and "rejected_truncated" (booleans, false when absent): true marks a completion cut before it
ended (a sample stopped at its maximum length), which DPO then trains without an EOS after it.

Where they come from: a file (`--preferences FILE`), or a folder DIR holding train.jsonl and, optionally,
validation.jsonl (`--preferences DIR`, or `--data-dir DIR` / PEFTLAB_DATA with DIR/preferences/). Without a
validation file the validation split is held out of the training file by prompt, so no prompt is in both:
the prompts ordered by the sha256 of their text, the first 10% of them (at least 1) with all their pairs. The rule
depends only on the prompts, never on the line order or a seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from peftlab.data import resolve_data_dir
from peftlab.errors import PeftlabError

SPLITS = ("train", "validation")
SPLIT_FILES = {"train": "train.jsonl", "validation": "validation.jsonl"}
HELD_OUT_SHARE = 0.1
HOLD_OUT_RULE = ("without a validation file, the prompts ordered by the sha256 of their text, the first 10% (at "
                 "least 1) are held out for validation with all their pairs")


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    origin: str  # file:line
    chosen_score: float | None = None
    rejected_score: float | None = None
    chosen_truncated: bool = False  # cut before it ended: no EOS follows it in training
    rejected_truncated: bool = False


def preference_files(data_dir: str | os.PathLike | None) -> tuple[Path, Path | None]:
    """(the training file, the validation file or None when validation is held out of the training file)."""
    if data_dir and Path(data_dir).is_file():
        return Path(data_dir), None
    folder = resolve_data_dir(data_dir, "preferences")
    train = folder / SPLIT_FILES["train"]
    if not train.is_file():
        raise PeftlabError(f"no preference pairs in {folder}: expected {train} (JSON lines with prompt, chosen, "
                           "rejected). Fix: --preferences FILE_OR_DIR")
    validation = folder / SPLIT_FILES["validation"]
    return train, validation if validation.is_file() else None


def present_splits(data_dir: str | os.PathLike | None) -> list[str]:
    """Both splits when a training file is found (validation may be held out of it), else none."""
    try:
        preference_files(data_dir)
    except PeftlabError:
        return []
    return list(SPLITS)


def read_preferences(split: str, data_dir: str | os.PathLike | None) -> list[PreferencePair]:
    """The split's pairs, in file order (see the module docstring for where they come from)."""
    if split not in SPLITS:
        raise PeftlabError(f"preferences has no split '{split}': it offers {', '.join(SPLITS)}")
    train, validation = preference_files(data_dir)
    if validation is not None:
        return read_pair_file(train if split == "train" else validation)
    pairs = read_pair_file(train)
    held_out = held_out_prompts([pair.prompt for pair in pairs], train)
    return [pair for pair in pairs if (pair.prompt in held_out) == (split == "validation")]


def held_out_prompts(prompts: list[str], path: Path) -> set[str]:
    """The validation prompts of a training file without a validation file (`HOLD_OUT_RULE`)."""
    distinct = sorted(set(prompts), key=lambda prompt: hashlib.sha256(prompt.encode()).hexdigest())
    if len(distinct) < 2:
        raise PeftlabError(f"{path}: all pairs have one prompt, so no prompt can be held out for validation. Fix: add "
                           f"pairs with other prompts, or give a validation.jsonl beside train.jsonl")
    return set(distinct[: max(1, math.floor(len(distinct) * HELD_OUT_SHARE))])


def read_pair_file(path: Path) -> list[PreferencePair]:
    """Every line of a preference file as a pair; any bad line is an error naming file:line and the fix."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise PeftlabError(f"{path}:{line}: not UTF-8 text ({error.reason}). Fix: save the file as UTF-8") from None
    except OSError as error:
        raise PeftlabError(f"cannot read the preference file {path}: {error.strerror}") from None
    pairs = [parse_pair(line, f"{path}:{number}") for number, line in enumerate(text.splitlines(), start=1)
             if line.strip()]
    if not pairs:
        raise PeftlabError(f"{path}: no preference pairs (the file is blank). Fix: one JSON object per line with "
                           "prompt, chosen and rejected")
    return pairs


def parse_pair(line: str, origin: str) -> PreferencePair:
    try:
        record = json.loads(line)
    except ValueError as error:
        raise PeftlabError(f"{origin}: not JSON ({error}). Fix: one JSON object per line") from None
    if not isinstance(record, dict):
        raise PeftlabError(f"{origin}: expected a JSON object with prompt, chosen and rejected, found "
                           f"{type(record).__name__}")
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(record.get(key), str):
            found = "missing" if key not in record else f"a {type(record[key]).__name__}"
            raise PeftlabError(f"{origin}: \"{key}\" must be a string, found {found}")
    for key in ("chosen", "rejected"):
        if not record[key].strip():
            raise PeftlabError(f"{origin}: \"{key}\" is empty; a pair compares two non-empty completions")
    if record["chosen"] == record["rejected"]:
        raise PeftlabError(f"{origin}: chosen and rejected are the same text; such a pair says nothing. Fix: drop "
                           "the line")
    scores = {}
    for key in ("chosen_score", "rejected_score"):
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise PeftlabError(f"{origin}: \"{key}\" must be a number, found {type(value).__name__}")
        scores[key] = None if value is None else float(value)
    marks = {key: record.get(key, False) for key in ("chosen_truncated", "rejected_truncated")}
    for key, value in marks.items():
        if not isinstance(value, bool):
            raise PeftlabError(f"{origin}: \"{key}\" must be true or false, found {json.dumps(value)}")
    return PreferencePair(record["prompt"], record["chosen"], record["rejected"], origin, **scores, **marks)
