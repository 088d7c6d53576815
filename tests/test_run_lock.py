"""One writer per run directory: RUN/.lock holds the training process's pid, host and start; a second `train` or
`--resume` is refused naming it, the lock of a process that no longer runs is taken over with a note, the lock goes
when the run ends however it ends, and recovery never removes a live run's files."""

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
from test_train import tiny_config, write_cola

from peftlab import PeftlabError
from peftlab.cli import main
from peftlab.engine import Callback, Engine
from peftlab.runs import LOCK, RunDir
from peftlab.train import train

# What a live run's atomic write of plots/loss.png looks like while it is being written (`fileio.atomic_write_file`).
LIVE_TEMPORARY = "plots/.loss.png.abcd1234"


@pytest.fixture
def sleeper():
    """A live process of this host (not this test's own), killed after the test."""
    process = subprocess.Popen(["sleep", "60"])
    yield process
    process.kill()
    process.wait()


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def write_lock(run: Path, pid: int, **extra) -> dict:
    holder = {"pid": pid, "host": socket.gethostname(), "started": "2024-05-01T10:00:00+0000", **extra}
    (run / LOCK).write_text(json.dumps(holder))
    return holder


def half_run(tiny_model_dir, tmp_path) -> Path:
    """A run stopped after its first epoch (resumable), without a lock."""
    data = write_cola(tmp_path / "data", train_rows=32, dev_rows=8)
    run = tmp_path / "run"
    train(tiny_config(tiny_model_dir, data, run, epochs=2), stop_after_epoch=1)
    assert not (run / LOCK).exists()
    return run


def test_a_resume_of_a_run_a_live_process_holds_is_refused_and_nothing_is_removed(tiny_model_dir, tmp_path, capsys,
                                                                                  sleeper):
    run = half_run(tiny_model_dir, tmp_path)
    holder = write_lock(run, sleeper.pid)
    (run / LIVE_TEMPORARY).write_bytes(b"being written")
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    capsys.readouterr()

    assert main(["train", "--resume", str(run)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    assert f"process {sleeper.pid} on {socket.gethostname()}" in error and "since 2024-05-01T10:00:00+0000" in error
    assert "in use" in error and "Fix:" in error
    # Nothing changed: no recovery ran (the live run's temporary file is there), no line was appended, lock intact.
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before
    assert json.loads((run / LOCK).read_text()) == holder

    # Recovery itself refuses while the lock's process runs.
    with pytest.raises(PeftlabError, match=f"process {sleeper.pid}"):
        RunDir(run).recover()
    assert (run / LIVE_TEMPORARY).is_file()


def test_a_new_run_into_a_folder_a_live_process_holds_is_refused_and_a_dry_run_takes_no_lock(tiny_model_dir, tmp_path,
                                                                                          capsys, sleeper):
    data = write_cola(tmp_path / "data", train_rows=32, dev_rows=8)
    run = tmp_path / "run"
    run.mkdir()
    holder = write_lock(run, sleeper.pid)
    with pytest.raises(PeftlabError, match=f"process {sleeper.pid} on"):
        train(tiny_config(tiny_model_dir, data, run, epochs=1))
    assert sorted(path.name for path in run.iterdir()) == [LOCK]  # no config.yaml, no metrics
    assert json.loads((run / LOCK).read_text()) == holder

    train(tiny_config(tiny_model_dir, data, run, epochs=1), dry_run=True)  # reads only
    assert json.loads((run / LOCK).read_text()) == holder
    train(tiny_config(tiny_model_dir, data, tmp_path / "dry", epochs=1), dry_run=True)
    assert not (tmp_path / "dry").exists()


def test_the_lock_of_a_process_that_no_longer_runs_is_taken_over_with_a_note(tiny_model_dir, tmp_path, capsys):
    run = half_run(tiny_model_dir, tmp_path)
    pid = dead_pid()
    write_lock(run, pid)
    (run / "plots/.loss.png.dead0001").write_bytes(b"left by the killed process")
    capsys.readouterr()

    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "took over the lock" in line]
    assert notes == [f"{run}: took over the lock of process {pid} on {socket.gethostname()} "
                     "(since 2024-05-01T10:00:00+0000), which is no longer running"]
    assert "removed the unfinished plots/.loss.png.dead0001" in out  # recovery ran, after the lock was taken
    assert json.loads((run / "summary.json").read_text())["finished"]
    assert not (run / LOCK).exists()


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="process start times come from Linux's /proc")
def test_a_lock_whose_pid_now_belongs_to_another_process_is_stale(tiny_model_dir, tmp_path, capsys, sleeper):
    run = half_run(tiny_model_dir, tmp_path)
    started = int(Path(f"/proc/{sleeper.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    write_lock(run, sleeper.pid, process_start=started - 1)  # the pid's earlier owner started at another time
    assert main(["train", "--resume", str(run)]) == 0
    assert f"took over the lock of process {sleeper.pid}" in capsys.readouterr().out
    assert not (run / LOCK).exists()


class LockWatcher(Callback):
    def __init__(self, run: Path):
        self.run, self.seen = run, []

    def on_step(self, engine, row):
        self.seen.append(json.loads((self.run / LOCK).read_text()))


def test_the_lock_is_held_while_training_and_gone_after_the_run_ends_fails_or_is_stopped(tiny_model_dir, tmp_path,
                                                                                        monkeypatch, capsys):
    data = write_cola(tmp_path / "data", train_rows=32, dev_rows=8)
    run = tmp_path / "run"
    watcher = LockWatcher(run)
    train(tiny_config(tiny_model_dir, data, run, epochs=1), callbacks=[watcher])
    assert watcher.seen and {holder["pid"] for holder in watcher.seen} == {os.getpid()}
    assert watcher.seen[0]["host"] == socket.gethostname() and watcher.seen[0]["started"]
    assert not (run / LOCK).exists()

    original = Engine.fit

    def failing_fit(self, *args, **kwargs):
        assert json.loads((self.run.path / LOCK).read_text())["pid"] == os.getpid()
        raise RuntimeError("boom inside training")

    monkeypatch.setattr(Engine, "fit", failing_fit)
    with pytest.raises(RuntimeError, match="boom"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "failed", epochs=1))
    assert not (tmp_path / "failed" / LOCK).exists() and (tmp_path / "failed" / "config.yaml").is_file()

    def interrupted_fit(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Engine, "fit", interrupted_fit)
    config = tiny_config(tiny_model_dir, data, tmp_path / "stopped", epochs=1)
    assert main(["train", "--task", "cola", "--model", tiny_model_dir, "--data-dir", data, "--device", "cpu",
                 "--epochs", "1", "--output-dir", config.output_dir]) == 130
    assert not (tmp_path / "stopped" / LOCK).exists()

    # A run that fails before it writes anything leaves no folder behind (the lock's folder goes with it).
    monkeypatch.setattr(Engine, "fit", original)
    monkeypatch.setattr("peftlab.train.build_model", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("no")))
    with pytest.raises(RuntimeError):
        train(tiny_config(tiny_model_dir, data, tmp_path / "never", epochs=1))
    assert not (tmp_path / "never").exists()
