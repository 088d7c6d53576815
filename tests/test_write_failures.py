"""A write that the disk refuses (read-only folder, disk full, no permission) is one line naming the path, the reason
and what was kept, exit code 2, in every command; nothing half-written or temporary is left behind; and every file
peftlab writes, safetensors included, has the mode the umask gives.

Tests run as root here, and root ignores permission bits, so a read-only or full folder is simulated where the
writers create their temporary files (`fileio`'s tempfile), and real failures come from paths under a regular file
(ENOTDIR) and from a file-size limit (RLIMIT_FSIZE: EFBIG, the way a full disk fails a write midway).
"""

import errno
import os
import re
import resource
import signal
import stat
import tempfile
import types
from pathlib import Path

import pytest
from test_train import tiny_config, write_cola

import peftlab.fileio
from peftlab.cli import main
from peftlab.errors import PeftlabError, WriteFailed
from peftlab.fileio import replace_directory, write_text_atomic
from peftlab.train import train

TEMPORARY = re.compile(r"\..+\.[A-Za-z0-9_]{8}")  # what mkstemp/mkdtemp beside a target are named


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """A one-epoch run (tiny GPT-2, synthetic CoLA), read but never changed by these tests."""
    folder = tmp_path_factory.mktemp("write-failures")
    data = write_cola(folder / "data", train_rows=32, dev_rows=8)
    train(tiny_config(tiny_model_dir, data, folder / "run", epochs=1))
    return folder / "run"


def refuse_writes_in(monkeypatch, folder: Path, number: int) -> None:
    """Make `folder` behave as read-only (EROFS), full (ENOSPC) or not ours (EACCES) for peftlab's writers: creating
    a file or folder in it fails as the system would say."""
    def refuse(function):
        def wrapped(*args, dir=None, **kwargs):
            if dir is not None and Path(dir).resolve().is_relative_to(folder.resolve()):
                raise OSError(number, os.strerror(number), str(Path(dir) / kwargs.get("prefix", "tmp")))
            return function(*args, dir=dir, **kwargs)
        return wrapped

    fake = types.SimpleNamespace(mkstemp=refuse(tempfile.mkstemp), mkdtemp=refuse(tempfile.mkdtemp))
    monkeypatch.setattr(peftlab.fileio, "tempfile", fake)


def leftovers(folder: Path) -> list[str]:
    return sorted(str(path) for path in folder.rglob(".*") if TEMPORARY.fullmatch(path.name) or path.name.endswith(".old"))


def assert_one_line(capsys, command: str, path, reason: str) -> str:
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error, error
    line = error.strip().splitlines()[-1]
    assert line.startswith(f"peftlab {command}: error: cannot write {path}"), line
    assert reason in line, line
    assert "kept" in line or "nothing was written" in line, line  # says what was kept
    return line


COMMANDS = {
    "export": lambda run, out: (["export", str(run), str(out / "export")], out / "export"),
    "export-merged": lambda run, out: (["export", str(run), str(out / "export"), "--format", "merged"], out / "export"),
    "report": lambda run, out: (["report", str(run), "--output-dir", str(out / "report")], out / "report"),
    "report-html": lambda run, out: (["report", str(run), "--html", str(out / "page.html")], out / "page.html"),
    "eval-predictions": lambda run, out: (["eval", str(run), "--device", "cpu", "--predictions",
                                           str(out / "predictions.jsonl")], out / "predictions.jsonl"),
}


@pytest.mark.parametrize("number, reason", [(errno.EROFS, "Read-only file system (EROFS)"),
                                            (errno.ENOSPC, "No space left on device (ENOSPC)"),
                                            (errno.EACCES, "Permission denied (EACCES)")])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_refused_write_is_one_line_with_path_reason_and_what_was_kept(run, tmp_path, monkeypatch, capsys, command,
                                                                        number, reason):
    out = tmp_path / "out"
    out.mkdir()
    arguments, target = COMMANDS[command](run, out)
    refuse_writes_in(monkeypatch, out, number)
    assert main(arguments) == 2
    assert_one_line(capsys, arguments[0], target, reason)
    assert not target.is_file() and not (target.is_dir() and any(target.iterdir()))  # report's mkdir is not refused
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("number, reason", [(errno.EROFS, "Read-only file system (EROFS)"),
                                            (errno.ENOSPC, "No space left on device (ENOSPC)")])
def test_train_into_a_refusing_folder_is_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys, number, reason):
    data = write_cola(tmp_path / "data", train_rows=16, dev_rows=8)
    folder = tmp_path / "runs"
    folder.mkdir()
    refuse_writes_in(monkeypatch, folder, number)
    arguments = ["train", "--task", "cola", "--model", tiny_model_dir, "--data-dir", data, "--epochs", "1",
                 "--batch-size", "16", "--device", "cpu", "--output-dir", str(folder / "run")]
    assert main(arguments) == 2
    line = assert_one_line(capsys, "train", folder / "run", reason)
    assert "the run directory keeps what was written before it" in line
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("command", sorted(COMMANDS) + ["train"])
def test_a_path_under_a_regular_file_is_one_line_naming_that_file(run, tiny_model_dir, tmp_path, capsys, command):
    blocking = tmp_path / "a-file"
    blocking.write_text("not a folder")
    if command == "train":
        arguments, target = ["train", "--task", "cola", "--model", tiny_model_dir, "--data-dir",
                             write_cola(tmp_path / "data", train_rows=16, dev_rows=8), "--device", "cpu",
                             "--output-dir", str(blocking / "run")], blocking / "run"
    else:
        arguments, target = COMMANDS[command](run, blocking)
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error, error
    assert str(target) in error and ("is a file, not a folder" in error or "Not a directory" in error), error
    assert blocking.read_text() == "not a folder" and leftovers(tmp_path) == []


@pytest.fixture
def file_size_limit():
    """Writes past `limit` bytes fail with EFBIG, as a full disk fails them midway (SIGXFSZ ignored)."""
    previous_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def limit(size: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, previous_limit[1]))

    yield limit
    resource.setrlimit(resource.RLIMIT_FSIZE, previous_limit)
    signal.signal(signal.SIGXFSZ, previous_handler)


def test_a_write_cut_midway_keeps_the_previous_export_whole(run, tmp_path, capsys, file_size_limit):
    target = tmp_path / "export"
    assert main(["export", str(run), str(target)]) == 0
    before = {path.name: path.read_bytes() for path in target.iterdir()}
    capsys.readouterr()
    file_size_limit(1 << 20)  # the merged model (GPT-2's vocabulary) is larger; the captured output is not
    try:
        code = main(["export", str(run), str(target), "--format", "merged"])
    finally:
        file_size_limit(resource.RLIM_INFINITY)
    assert code == 2
    line = assert_one_line(capsys, "export", target, "File too large (EFBIG)")
    assert "the previous export is kept unchanged" in line
    assert {path.name: path.read_bytes() for path in target.iterdir()} == before
    assert leftovers(tmp_path) == []


def test_a_failed_swap_puts_the_previous_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "folder"
    replace_directory(target, lambda path: (path / "MARK").write_text("old"), "MARK")
    real_replace = os.replace

    def refuse_the_new_one(source, destination):
        if Path(destination) == target and Path(source) != target.with_name(".folder.old"):  # the new one, not the old
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(source))
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", refuse_the_new_one)
    with pytest.raises(WriteFailed, match=r"cannot write .*folder: No space left on device \(ENOSPC\); the previous "
                                          r"folder is kept unchanged"):
        replace_directory(target, lambda path: (path / "MARK").write_text("new"), "MARK")
    assert (target / "MARK").read_text() == "old" and sorted(path.name for path in tmp_path.iterdir()) == ["folder"]


def test_write_failed_is_a_peftlab_error_and_an_os_error(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(WriteFailed) as caught:
        write_text_atomic(tmp_path / "a-file" / "x.txt", "x")
    assert isinstance(caught.value, PeftlabError) and isinstance(caught.value, OSError)
    assert caught.value.errno == errno.ENOTDIR and caught.value.filename == str(tmp_path / "a-file" / "x.txt")


def test_a_library_write_outside_fileio_is_one_line(run, tmp_path, monkeypatch, capsys):
    import peftlab.report

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "report" / "val_loss.png"))

    monkeypatch.setattr(peftlab.report, "write_text_atomic", full)
    assert main(["report", str(run), "--output-dir", str(tmp_path / "report")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error, error
    assert f"cannot write {tmp_path / 'report' / 'val_loss.png'}: No space left on device (ENOSPC)" in error


def test_exports_and_checkpoints_follow_the_umask(run, tiny_model_dir, tmp_path):
    previous = os.umask(0o022)
    try:
        assert main(["export", str(run), str(tmp_path / "peft")]) == 0
        assert main(["export", str(run), str(tmp_path / "merged"), "--format", "merged"]) == 0
        data = write_cola(tmp_path / "data", train_rows=16, dev_rows=8)
        train(tiny_config(tiny_model_dir, data, tmp_path / "run", epochs=1))
    finally:
        os.umask(previous)
    written = [path for folder in ("peft", "merged", "run") for path in (tmp_path / folder).rglob("*")]
    assert any(path.name == "adapter_model.safetensors" for path in written)
    assert any(path.suffix == ".safetensors" and "checkpoints" in path.parts for path in written)
    for path in written:
        expected = 0o755 if path.is_dir() else 0o644
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
