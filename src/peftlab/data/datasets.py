"""The datasets peftlab knows, one row each: adding a dataset is a reader module and one row here."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from peftlab.data import cola, preferences, rotten_tomatoes, squad
from peftlab.errors import PeftlabError


@dataclass(frozen=True)
class Dataset:
    name: str
    read: Callable[[str, str | os.PathLike | None], list]  # (split, data_dir) -> examples
    splits: tuple[str, ...]
    present: Callable[[str | os.PathLike | None], list[str]]  # data_dir -> the splits whose files are there
    objectives: tuple[str, ...]  # the workloads it can be trained with; the first is the default
    max_length: int  # tokens per example when --max-length is not given
    test_split: str | None = None  # held-out split scored with checkpoints/best after training
    label_names: tuple[str, ...] | None = None  # classification datasets: label index -> name

    @property
    def default_objective(self) -> str:
        return self.objectives[0]


DATASETS: dict[str, Dataset] = {dataset.name: dataset for dataset in (
    Dataset("cola", cola.read_cola, tuple(cola.SPLIT_FILES), cola.present_splits, ("classification", "instruct"), 128,
            label_names=cola.LABEL_NAMES),
    Dataset("rotten_tomatoes", rotten_tomatoes.read_rotten_tomatoes, tuple(rotten_tomatoes.SPLIT_SIZES),
            rotten_tomatoes.present_splits, ("instruct", "classification", "lm"), 128, test_split="test",
            label_names=rotten_tomatoes.LABEL_NAMES),
    Dataset("squad", squad.read_squad, tuple(squad.SPLIT_FILES), squad.present_splits, ("qa",), 384),
    Dataset("preferences", preferences.read_preferences, preferences.SPLITS, preferences.present_splits, ("dpo",), 256),
)}


def check_split(name: str, split: str, data_dir: str | os.PathLike | None) -> None:
    """`split` is one of the task's splits and its file is in the data directory (before any model loads)."""
    dataset = get_dataset(name)
    present = dataset.present(data_dir)
    if split in present:
        return
    if split in dataset.splits:
        raise PeftlabError(f"{name}'s {split} split has no file in the data directory (--data-dir / PEFTLAB_DATA); "
                           f"present: {', '.join(present) or 'none'}")
    raise PeftlabError(f"{name} has no split '{split}': it offers {', '.join(dataset.splits)}; present here: "
                       f"{', '.join(present) or 'none'}")


def get_dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise PeftlabError(f"unknown task '{name}': expected one of {', '.join(DATASETS)}")
    return DATASETS[name]


def objective_of(name: str, objective: str) -> str:
    """The objective a run trains `name` with: `objective`, or the dataset's default when it is empty."""
    dataset = get_dataset(name)
    chosen = objective or dataset.default_objective
    if chosen not in dataset.objectives:
        offering = [other.name for other in DATASETS.values() if chosen in other.objectives]
        hint = f" ('{chosen}' trains --task {' or '.join(offering)})" if offering else ""
        raise PeftlabError(f"task {name} has no objective '{chosen}': expected one of {', '.join(dataset.objectives)}"
                           + hint)
    return chosen


def only_dataset_of(objective: str | None) -> str | None:
    """The one dataset that offers `objective` (dpo: preferences), so `--objective dpo` needs no --task; None when
    several or none do."""
    offering = [dataset.name for dataset in DATASETS.values() if objective in dataset.objectives]
    return offering[0] if len(offering) == 1 else None
