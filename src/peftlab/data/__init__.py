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
