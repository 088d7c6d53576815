"""A run directory (`RunDir`): its layout, its states (new, restart, resume, done), its files and checkpoints
(the training state codec included), and recovery from a killed process.

    <run>/config.yaml          the whole configuration (written first)
    <run>/metrics.jsonl        one JSON object per evaluation
    <run>/steps.jsonl          one JSON object per optimizer step (appended; trimmed to the checkpoint on resume)
    <run>/summary.json         written when the run (or an interrupted part of it) ends
    <run>/plots/*.png
    <run>/checkpoints/best     adapter of the best validation score so far
    <run>/checkpoints/last     adapter + optimizer + training state after the last finished epoch, or after the
                               last --save-every step (with the position in the epoch)
    <run>/trackers/            TensorBoard / W&B files (--report-to)
    <run>/.lock                while a process trains into the run: its pid, host and start (JSON); one writer

Every file is written atomically and every checkpoint folder is swapped in whole (`fileio.replace_directory`), so
a process killed at any moment leaves at most a hidden staging folder or temporary file, or a checkpoint renamed
to `.<name>.old` mid-swap; `RunDir.recover` undoes each of these. A run directory has one writer: `RunDir.lock`
refuses a second one while the holder of `.lock` runs, and takes over the lock of a process that no longer does.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from peftlab.config import RunConfig, load_config, same_run, save_config
from peftlab.errors import PeftlabError
from peftlab.fileio import (_umask, atomic_write_file, finite_or_null, read_json, read_text, recover_directory,
                            replace_directory, retired_path, unfinished_writes, write_json_lines, write_text_atomic)
from peftlab.peft import load_adapter, save_adapter
from peftlab.peft.checkpoint import CONFIG_FILE as ADAPTER_MARKER

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
STEPS = "steps.jsonl"
SUMMARY = "summary.json"
PLOTS = "plots"
CHECKPOINTS = "checkpoints"
# What a training run writes at the top of its directory; a new run refuses a folder that already has any of it.
TRACKERS = "trackers"
RUN_ENTRIES = (CONFIG, METRICS, STEPS, SUMMARY, PLOTS, CHECKPOINTS, TRACKERS)
# The files of checkpoints/last besides the adapter's: all of them, or the checkpoint is damaged.
TRAINING_STATE_FILES = ("optimizer.safetensors", "optimizer.json", "training_state.safetensors", "training_state.json")
LOCK = ".lock"


class RunDir:
    """One run directory: where each file is, its state, and reading/writing everything in it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def checkpoint(self, name: str) -> Path:
        return self.path / CHECKPOINTS / name

    @property
    def plots(self) -> Path:
        return self.path / PLOTS

    # --- state -----------------------------------------------------------------------------------------------

    def state(self, epochs: int) -> str:
        """What training into the folder means now: new, restart, resume or done.

        new: nothing of a run is there. done: summary.json says the run finished (all `epochs`, or its --max-steps).
        resume: checkpoints/last is there (or its copy left mid-swap). restart: the run started but no epoch finished, so nothing
        is resumable and it starts again from step 0 with its own config.yaml (the same steps are replayed).
        """
        if not (self.path / CONFIG).is_file():
            return "new"
        summary = self.path / SUMMARY
        if summary.is_file():
            recorded = self.read_summary()
            if recorded.get("finished", recorded.get("epochs_completed") == epochs):  # older summaries: epochs only
                return "done"
        last = self.checkpoint("last")
        return "resume" if last.is_dir() or retired_path(last).is_dir() else "restart"

    def check_new(self) -> None:
        """A new run may go into a folder only if none of what it writes is there yet (nothing is overwritten)."""
        present = [name for name in RUN_ENTRIES if (self.path / name).exists()]
        if (self.path / CONFIG).is_file():
            raise PeftlabError(f"{self.path} already holds a run. Fix: --resume {self.path} to continue it, or choose "
                               "another --output-dir")
        if present:
            raise PeftlabError(f"{self.path} already has {', '.join(present)}, which a run would overwrite. "
                               "Fix: choose another --output-dir")

    def check_same_config(self, config: RunConfig) -> None:
        """A run is continued only with the configuration it was started with."""
        if not same_run(load_config(self.path / CONFIG), config):
            raise PeftlabError(f"{self.path} was started with another configuration; choose another output folder "
                               "(or delete that run)")

    def recover(self) -> list[str]:
        """Clean up after a killed process (see the module docstring); returns one line per repair, for the log.
        Refused (nothing removed) while another live process holds the run's lock: its files are not leftovers."""
        holder = self.lock_holder()
        if holder is not None and not _is_this_process(holder) and _holder_alive(holder):
            raise self._in_use(holder)
        done = []
        for name in ("best", "last"):
            done += [f"{CHECKPOINTS}/{line}" for line in recover_directory(self.checkpoint(name), ADAPTER_MARKER)]
        files = [self.path / name for name in (CONFIG, METRICS, SUMMARY)] + [self.plots / "loss.png",
                                                                          self.plots / "metrics.png"]
        for leftover in (path for file in files for path in unfinished_writes(file)):
            leftover.unlink()  # an atomic write that never got renamed into place
            done.append(f"removed the unfinished {leftover.relative_to(self.path)}")
        return done

    # --- one writer ------------------------------------------------------------------------------------------

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK

    def lock_holder(self) -> dict | None:
        """What .lock says about the process holding it (pid, host, started, ...); None when there is no lock, and
        {} when the file cannot be read as one."""
        try:
            holder = json.loads(self.lock_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def lock(self, say=print) -> "RunLock":
        """Take the run directory's lock (creating the directory if needed): this process is its one writer until
        `RunLock.release`. A lock held by a live process is a PeftlabError naming it; the lock of a process that no
        longer runs (same host: the pid is gone, or was reused by a later process) is taken over with a note."""
        created = not self.path.exists()
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "process_start": _process_start(os.getpid()), "boot_id": _boot_id()}
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            for _ in range(5):
                if _create_exclusive(self.lock_path, json.dumps(record) + "\n"):
                    return RunLock(self.lock_path, record, created)
                holder = self.lock_holder()
                if holder is None:
                    continue  # released between the two looks
                if not holder:  # being written by a file system without hard links, or not a lock of ours
                    time.sleep(0.2)
                    holder = self.lock_holder()
                    if not holder:
                        if holder is None:
                            continue
                        raise PeftlabError(f"{self.lock_path} cannot be read as a lock, so {self.path} may be in use "
                                           "by another peftlab process. Fix: if no other `peftlab train` writes into "
                                           f"{self.path}, delete {self.lock_path} and run the command again")
                if _holder_alive(holder):
                    raise self._in_use(holder)
                if self._take_over(holder):
                    say(f"{self.path}: took over the lock of process {holder.get('pid')} on {holder.get('host')} "
                        f"(since {holder.get('started')}), which is no longer running")
        except OSError as error:
            if created:
                _remove_empty(self.path)
            raise PeftlabError(f"cannot write the lock file {self.lock_path}: {error.strerror or error}; nothing was "
                               "written. Fix: make the folder writable or choose another --output-dir") from None
        except BaseException:
            if created:
                _remove_empty(self.path)
            raise
        raise PeftlabError(f"{self.lock_path} keeps changing: other processes are taking {self.path} at the same time. "
                           "Fix: run one `peftlab train` per run directory")

    def _take_over(self, holder: dict) -> bool:
        """Remove the stale lock `holder` (atomically: moved aside, then checked to be the one judged stale)."""
        aside = self.lock_path.with_name(f"{LOCK}-stale-{os.getpid()}")
        try:
            os.replace(self.lock_path, aside)
        except FileNotFoundError:
            return False  # another process took it over first
        try:
            moved = json.loads(aside.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            moved = None
        if moved != holder:  # a lock written since the look: not ours to remove; put it back
            try:
                os.link(aside, self.lock_path)
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def _in_use(self, holder: dict) -> PeftlabError:
        host = holder.get("host")
        elsewhere = "" if host == socket.gethostname() else f"; if it no longer runs on {host}, delete {self.lock_path}"
        return PeftlabError(f"{self.path} is in use: peftlab process {holder.get('pid')} on {host} has been writing "
                            f"into it since {holder.get('started')} (lock {self.lock_path}). Fix: wait for that run "
                            f"to end (or stop it), then run the command again{elsewhere}")

    # --- files -----------------------------------------------------------------------------------------------

    def read_config(self) -> RunConfig:
        if not (self.path / CONFIG).is_file():
            raise PeftlabError(f"{self.path} is not a run directory (no {CONFIG})")
        config = load_config(self.path / CONFIG)
        config.output_dir = str(self.path)  # where the run is now, whatever path it was trained under
        return config

    def write_config(self, config: RunConfig) -> None:
        save_config(config, self.path / CONFIG)

    def write_metrics(self, rows: list[dict]) -> None:
        write_json_lines(self.path / METRICS, rows)

    def append_step(self, row: dict) -> None:
        """One line of steps.jsonl; a line cut by a kill is dropped by `trim_steps` on resume."""
        with open(self.path / STEPS, "a", encoding="utf-8") as file:
            file.write(json.dumps(finite_or_null(row), allow_nan=False) + "\n")

    def trim_steps(self, step: int) -> None:
        """steps.jsonl up to `step` (where checkpoints/last is): later lines are replayed by the resumed run."""
        path = self.path / STEPS
        if not path.is_file():
            return
        kept = []
        for line in read_text(path, "steps file").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                break  # the line a kill cut short, and nothing after it
            if row.get("step", 0) > step:
                break
            kept.append(row)
        write_json_lines(path, kept)

    def read_steps(self) -> list[dict]:
        return self._read_lines(STEPS, "steps file")

    def read_metrics(self) -> list[dict]:
        return self._read_lines(METRICS, "metrics file")

    def _read_lines(self, name: str, what: str) -> list[dict]:
        """A JSON-lines file's rows; a line that is not JSON is an error naming file and line."""
        path, rows = self.path / name, []
        for number, line in enumerate(read_text(path, what).splitlines(), start=1):
            try:
                rows += [json.loads(line)] if line.strip() else []
            except ValueError as error:
                raise PeftlabError(f"{path}:{number}: not valid JSON ({error})") from None
        return rows

    def read_summary(self) -> dict:
        return read_json(self.path / SUMMARY, "run summary")

    def write_summary(self, summary: dict) -> None:
        write_text_atomic(self.path / SUMMARY, json.dumps(finite_or_null(summary), indent=2, allow_nan=False) + "\n")

    # --- checkpoints -----------------------------------------------------------------------------------------

    def save_best(self, model: nn.Module, base_model: str, metadata: dict) -> None:
        replace_directory(self.checkpoint("best"), lambda path: save_adapter(model, path, base_model, metadata),
                          ADAPTER_MARKER)

    def save_last(self, model: nn.Module, base_model: str, metadata: dict, optimizer_state: dict,
                  training_state: dict) -> None:
        """checkpoints/last: the adapter plus what resuming needs (optimizer, scheduler, RNG, history)."""
        def fill(path: Path) -> None:
            save_adapter(model, path, base_model, metadata)
            save_state(path, "optimizer", optimizer_state)
            save_state(path, "training_state", training_state)

        replace_directory(self.checkpoint("last"), fill, ADAPTER_MARKER)

    def load_checkpoint(self, model: nn.Module, name: str, base_model: str) -> dict:
        """Load checkpoints/<name> (best or last) into `model`; returns the adapter's config."""
        directory = self.checkpoint(name)
        if not directory.is_dir():
            raise PeftlabError(f"{self.path} has no checkpoint '{name}' (expected {directory})")
        return load_adapter(model, directory, base_model)

    def restore_last(self, accelerator, model, optimizer, scheduler, base_model: str) -> dict:
        """Load checkpoints/last into the prepared objects; returns the saved history (as a dict). A damaged or
        incomplete checkpoint is a clear error."""
        last = self.checkpoint("last")
        missing = [name for name in (ADAPTER_MARKER, *TRAINING_STATE_FILES) if not (last / name).is_file()]
        if missing:
            raise damaged_checkpoint(last, f"{', '.join(missing)} missing")
        optimizer_state, state = load_state(last, "optimizer"), load_state(last, "training_state")
        try:
            written_by = state["num_processes"]
            if written_by != accelerator.num_processes:
                raise PeftlabError(f"{last} was written by {written_by} process(es); resume with the same number "
                                   f"(now {accelerator.num_processes})")
            load_adapter(accelerator.unwrap_model(model), last, base_model)
            optimizer.load_state_dict(optimizer_state)
            scheduler.load_state_dict(state["scheduler"])
            rng = state["rng"][accelerator.process_index]
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
            return dict(state["history"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
            raise damaged_checkpoint(last, f"its training state does not fit this run: {type(error).__name__}: "
                                     f"{error}") from None


class RunLock:
    """A run directory's lock held by this process (`RunDir.lock`); `release` removes it (once, and only while it
    is still this process's lock), and the directory too when the lock created it and nothing else went in."""

    def __init__(self, path: Path, record: dict, created_directory: bool):
        self.path, self.record, self.created_directory = path, record, created_directory
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        try:
            if json.loads(self.path.read_text(encoding="utf-8")) == self.record:
                self.path.unlink()
        except (OSError, ValueError):
            pass  # gone already, or replaced by hand: not ours to remove
        if self.created_directory:
            _remove_empty(self.path.parent)


def _create_exclusive(path: Path, text: str) -> bool:
    """Write `path` whole with `text` unless it exists (False then). A hard link of a finished temporary file
    makes it appear whole and fails if the path exists; where the file system has no hard links, O_EXCL."""
    handle, temporary = tempfile.mkstemp(prefix=f"{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, 0o666 & ~_umask())
        try:
            os.link(temporary, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here
            pass
        try:
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        return True
    finally:
        os.unlink(temporary)


def _remove_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass  # something is in it: kept


def _is_this_process(holder: dict) -> bool:
    return holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()


def _holder_alive(holder: dict) -> bool:
    """Whether the process a lock names may still be running. A process on another host cannot be checked (alive);
    on this one, it is gone when the machine has rebooted since, when its pid is gone, or when the pid now belongs to
    a process started at another time (a reused pid; Linux's /proc)."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return True
    boot = _boot_id()
    if holder.get("boot_id") and boot and holder["boot_id"] != boot:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    recorded, now = holder.get("process_start"), _process_start(pid)
    return recorded is None or now is None or recorded == now


def _process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot: field 22 of /proc/<pid>/stat), None without /proc."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def damaged_checkpoint(last: Path, problem: str) -> PeftlabError:
    run = last.parent.parent
    return PeftlabError(f"{last} is damaged ({problem}), so the run cannot continue from it. Fix: move {last} away "
                        f"and `--resume {run}` again (it starts over from step 0 with the run's config.yaml), or "
                        "train into another --output-dir")


# ----------------------------------------------------------------------------------------------------------
# Training state on disk (safetensors + JSON, never pickle)


def _flatten(value, prefix: str, tensors: dict[str, torch.Tensor]):
    """Split a nested state (dicts, lists, tensors, scalars) into a JSON skeleton and a flat tensor dict."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().to("cpu").contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        return {"__dict__": [[_flatten(key, f"{prefix}/k{i}", tensors), _flatten(item, f"{prefix}/{i}", tensors)]
                             for i, (key, item) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        return [_flatten(item, f"{prefix}/{i}", tensors) for i, item in enumerate(value)]
    return value


def _unflatten(skeleton, tensors: dict[str, torch.Tensor]):
    if isinstance(skeleton, dict) and "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if isinstance(skeleton, dict) and "__dict__" in skeleton:
        return {_unflatten(key, tensors): _unflatten(item, tensors) for key, item in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [_unflatten(item, tensors) for item in skeleton]
    return skeleton


def save_state(directory: Path, name: str, state: dict) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "s", tensors)
    # Through fileio, so these files get the umask's mode like every other (safetensors' writer gives 0600).
    atomic_write_file(directory / f"{name}.safetensors", lambda path: save_file(tensors, path))
    write_text_atomic(directory / f"{name}.json", json.dumps(skeleton))


def load_state(directory: Path, name: str) -> dict:
    """A state saved by `save_state`; an unreadable file is a `damaged_checkpoint` error naming it."""
    try:
        tensors = load_file(directory / f"{name}.safetensors")
    except (OSError, SafetensorError) as error:
        raise damaged_checkpoint(directory, f"{name}.safetensors cannot be read: {error}") from None
    try:
        skeleton = json.loads((directory / f"{name}.json").read_text(encoding="utf-8"))
        return _unflatten(skeleton, tensors)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise damaged_checkpoint(directory, f"{name}.json cannot be read: {type(error).__name__}: {error}") from None


def run_environment(device, precision: str, num_processes: int, command: str | None) -> dict:
    """What config.yaml records about where and how a run was started (a training, an icl evaluation)."""
    versions = {name: metadata.version(name) for name in ("peftlab", "torch", "transformers", "accelerate")}
    return versions | {"command": command, "device": str(device), "precision": precision, "weights": "fp32",
                       "num_processes": num_processes, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
