"""Files in and out: every file and directory peftlab produces appears whole or not at all, with the permissions
the user's umask gives; reading a file that is missing, unreadable or not UTF-8 is an error naming file and line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from peftlab.errors import PeftlabError, WriteFailed


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def atomic_write_file(path: Path, write: Callable[[str], object]) -> None:
    """Call write(temporary_path) next to `path`, then rename it into place (a crash never leaves half a file).

    The file gets the mode a plain `open(path, "w")` would give (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    kept = _what_is_kept(path)
    _make_folder(path, kept)
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as error:
        raise _write_failed(path, error, kept) from None
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except Exception as error:
        if _os_reason(error) is None:
            raise
        raise _write_failed(path, error, kept) from None
    finally:
        with contextlib.suppress(OSError):
            if os.path.exists(temporary):
                os.remove(temporary)


def _os_reason(error: BaseException) -> tuple[int | None, str] | None:
    """The errno and "reason (ENAME)" of an operating-system error, including safetensors' (it reports them as text:
    "I/O error: No space left on device (os error 28)"); None for any other exception."""
    if isinstance(error, WriteFailed):
        return error.errno, error.strerror
    if isinstance(error, OSError):
        number, text = error.errno, error.strerror or str(error)
    else:
        found = re.search(r"\(os error (\d+)\)", str(error))
        if type(error).__name__ != "SafetensorError" or found is None:
            return None
        number = int(found.group(1))
        text = os.strerror(number)
    name = errno.errorcode.get(number) if number else None
    return number, f"{text} ({name})" if name else text


def _what_is_kept(target: Path) -> str:
    """What a failed write of `target` leaves: the writers below change nothing until the final rename."""
    if target.exists() or target.is_symlink():
        return f"the previous {target.name} is kept unchanged"
    return "nothing was written there"


def _write_failed(target: Path, error: BaseException, kept: str) -> WriteFailed:
    number, reason = _os_reason(error)
    if isinstance(error, WriteFailed):
        return WriteFailed(target, number, reason, kept)
    where = getattr(error, "filename", None)
    if where is not None and Path(where) not in (target, target.parent) and f".{target.name}." not in str(where):
        reason += f" (at {where})"  # e.g. the folder that could not be created; never a temporary name
    return WriteFailed(target, number, reason, kept)


def _make_folder(target: Path, kept: str) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        blocking = next((folder for folder in reversed(target.parents) if folder.exists() and not folder.is_dir()), None)
        if blocking is not None:  # mkdir says "File exists" or "Not a directory": name the file in the way
            raise WriteFailed(target, errno.ENOTDIR, f"{blocking} is a file, not a folder", kept) from None
        raise _write_failed(target, error, kept) from None


def _follow_umask(folder: Path) -> None:
    """Give every file and folder under `folder` the mode a plain open()/mkdir() would (0666/0777 less the umask);
    libraries write some with mkstemp's 0600 (safetensors' save_file does)."""
    mask = _umask()
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        executable = path.is_dir() or path.stat().st_mode & 0o111
        path.chmod((0o777 if executable else 0o666) & ~mask)


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write_file(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def write_json_lines(path: Path, records: list[dict]) -> None:
    """One JSON object per line, atomically; non-finite floats become null (bare NaN is not JSON)."""
    write_text_atomic(path, "".join(json.dumps(finite_or_null(record), allow_nan=False) + "\n" for record in records))


def finite_or_null(value: Any) -> Any:
    """`value` with every NaN / ±inf float (in nested dicts and lists) replaced by None."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of `path` (a `what`, for messages); a missing file or a byte that is not UTF-8 is an error
    naming the file and the line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise PeftlabError(f"cannot read {what} {path}: {error.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise PeftlabError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}). "
                           f"Fix: save the {what} as UTF-8") from None


def read_json(path: Path, what: str) -> Any:
    """The JSON value in `path`; unreadable or invalid JSON is an error naming the file, line and column."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise PeftlabError(f"{path}: not valid JSON ({error.msg}: line {error.lineno}, column {error.colno})") from None


def check_writable(path: Path) -> None:
    """Fail now, before long work whose result goes to `path`, if it cannot be written (its folder is created)."""
    path = Path(path)
    kept = "nothing was written. Fix: choose another path"
    _make_folder(path, kept)
    if path.is_dir():
        raise WriteFailed(path, errno.EISDIR, "it is a folder", kept)
    try:  # by trying: os.access says yes to root, and knows nothing of read-only file systems
        handle, probe = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as error:
        raise _write_failed(path, error, kept) from None
    os.close(handle)
    os.remove(probe)


def is_replaceable(target: Path, marker: str) -> bool:
    """Whether `replace_directory` may replace `target`: it does not exist, is an empty folder, or is a folder
    peftlab wrote (it holds the file `marker`)."""
    if not target.exists() and not target.is_symlink():
        return True
    return target.is_dir() and not target.is_symlink() and (not any(target.iterdir()) or (target / marker).is_file())


def replace_directory(target: Path, fill: Callable[[Path], object], marker: str, overwrite: bool = False) -> Path:
    """Build a directory beside `target` with fill(path), then swap it in place of `target`; returns `target`.

    `fill` must write the file `marker` into the directory: only a folder holding it (or an empty one) is ever
    replaced, so a user's folder or file at `target` is never deleted; `overwrite` lifts that rule (callers
    decide when a user may ask for it). The old version is renamed to `.<name>.old` before the new one takes
    its name and removed afterwards, so at every moment one complete version exists (see `recover_directory`).
    """
    target = Path(target)
    if not overwrite and not is_replaceable(target, marker):
        raise PeftlabError(f"{target} exists and was not written by peftlab (no {marker} in it); nothing was changed. "
                           "Fix: choose a path that does not exist, or move it away first")
    kept = _what_is_kept(target)
    _make_folder(target, kept)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as error:
        raise _write_failed(target, error, kept) from None
    retired = retired_path(target)
    try:
        staging.chmod(0o777 & ~_umask())
        fill(staging)
        if not (staging / marker).is_file():
            raise RuntimeError(f"replace_directory: fill() did not write {marker}")  # a programming error
        _follow_umask(staging)
        if target.exists() or target.is_symlink():
            _remove(retired)
            os.replace(target, retired)
        try:
            os.replace(staging, target)
        except OSError:
            if retired.exists() and not (target.exists() or target.is_symlink()):
                os.replace(retired, target)  # put the previous version back
            raise
        with contextlib.suppress(OSError):  # the new version is in place; recover_directory removes it later
            _remove(retired)
    except Exception as error:
        if _os_reason(error) is None:
            raise
        raise _write_failed(target, error, kept) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def unfinished_writes(target: Path) -> list[Path]:
    """What a killed `atomic_write_file` / `replace_directory` of `target` left: `.<name>.` + mkstemp's 8
    characters (the retired `.<name>.old` is not one of them)."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[A-Za-z0-9_]{{8}}")
    return sorted(path for path in target.parent.glob(f".{target.name}.*") if pattern.fullmatch(path.name))


def retired_path(target: Path) -> Path:
    """Where `replace_directory` keeps the previous version of `target` during the swap."""
    return target.with_name(f".{target.name}.old")


def recover_directory(target: Path, marker: str) -> list[str]:
    """Undo what a process killed inside `replace_directory` left beside `target`; returns what was done.

    Killed while filling: a hidden staging folder `.<name>.XXXXXXXX` (removed). Killed between the two renames:
    `target` is missing and `.<name>.old` is the previous complete version (renamed back). Killed before the
    last removal: both exist (the old one is removed).
    """
    done = []
    for staging in unfinished_writes(target):
        _remove(staging)
        done.append(f"removed the unfinished {staging.name}")
    retired = retired_path(target)
    if retired.is_dir() and (retired / marker).is_file():
        if not target.exists():
            os.replace(retired, target)
            done.append(f"restored {target.name} from {retired.name} (the swap to a newer one was interrupted)")
        else:
            _remove(retired)
            done.append(f"removed the leftover {retired.name}")
    return done


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
