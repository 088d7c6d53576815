"""Dataset readers: original file formats -> lists of examples; bad data is an error naming file and line."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from peftlab.errors import PeftlabError


@dataclass(frozen=True)
class LabelledText:
    """One classification example and where it came from (file:line), for error messages and audits."""

    text: str
    label: int
    origin: str


def evenly_spaced(items: list, count: int) -> list:
    """`count` items spread evenly over `items` (all of them when count is 0 or too large), in order.

    Used for --train-limit / --eval-limit: files sorted by label (Rotten Tomatoes) or by source (CoLA) would
    give a one-sided subset if cut at the front.
    """
    if count <= 0 or count >= len(items):
        return list(items)
    return [items[index * len(items) // count] for index in range(count)]


def resolve_data_dir(data_dir: str | os.PathLike | None, dataset: str) -> Path:
    """The folder holding `dataset`'s files: <data-dir>/<dataset> (or <data-dir> itself if the files are there)."""
    root = data_dir or os.environ.get("PEFTLAB_DATA")
    if not root:
        raise PeftlabError(
            f"no data directory for {dataset}: pass --data-dir DIR or set PEFTLAB_DATA "
            "(on this project's machines: ../shared/data)"
        )
    root = Path(root)
    if not root.is_dir():
        raise PeftlabError(f"data directory {root} does not exist (from --data-dir / PEFTLAB_DATA)")
    return root / dataset if (root / dataset).is_dir() else root


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise PeftlabError(f"{what} not found: expected the file {path}")
    return path
