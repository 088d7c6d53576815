"""Atomic writes: every file and directory peftlab produces appears whole or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from peftlab.errors import PeftlabError


def atomic_write_file(path: Path, write: Callable[[str], object]) -> None:
    """Call write(temporary_path) next to `path`, then rename it into place (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write_file(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def check_writable(path: Path) -> None:
    """Fail now, before long work whose result goes to `path`, if it cannot be written (its folder is created)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PeftlabError(f"cannot write {path}: {error.strerror} ({error.filename}); choose another path") from None
    if path.is_dir() or not os.access(path.parent, os.W_OK):
        raise PeftlabError(f"cannot write {path}: {'it is a folder' if path.is_dir() else 'its folder is not writable'}; "
                           "choose another path")


def replace_directory(target: Path, fill: Callable[[Path], object]) -> Path:
    """Build a directory beside `target` with fill(path), then swap it in place of `target`; returns `target`.

    The old directory is renamed aside before the new one takes its name and removed afterwards, so at every
    moment one complete version exists.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)
    retired = target.with_name(f".{target.name}.old")
    try:
        fill(staging)
        if target.exists():
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(target, retired)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
