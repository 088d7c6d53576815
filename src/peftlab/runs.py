"""A run directory's layout and its states: new, restart, resume or done, and recovery from a killed process.

    <run>/config.yaml          the whole configuration (written first)
    <run>/metrics.jsonl        one JSON object per evaluation
    <run>/summary.json         written when the run (or an interrupted part of it) ends
    <run>/plots/*.png
    <run>/checkpoints/best     adapter of the best validation score so far
    <run>/checkpoints/last     adapter + optimizer + training state after the last finished epoch

Every file is written atomically and every checkpoint folder is swapped in whole (`fileio.replace_directory`), so
a process killed at any moment leaves at most a hidden staging folder or temporary file, or a checkpoint renamed
to `.<name>.old` mid-swap; `recover_run` undoes each of these.
"""

from __future__ import annotations

import re
from pathlib import Path

from peftlab.errors import PeftlabError
from peftlab.fileio import read_json, recover_directory, retired_path
from peftlab.peft.checkpoint import CONFIG_FILE as ADAPTER_MARKER

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
PLOTS = "plots"
CHECKPOINTS = "checkpoints"
# What a training run writes at the top of its directory; a new run refuses a folder that already has any of it.
RUN_ENTRIES = (CONFIG, METRICS, SUMMARY, PLOTS, CHECKPOINTS)
# The files of checkpoints/last besides the adapter's: all of them, or the checkpoint is damaged.
TRAINING_STATE_FILES = ("optimizer.safetensors", "optimizer.json", "training_state.safetensors", "training_state.json")
STATES = ("new", "restart", "resume", "done")


def checkpoint_dir(run: Path, name: str) -> Path:
    return Path(run) / CHECKPOINTS / name


def run_state(run: Path, epochs: int) -> str:
    """What training into `run` means now.

    new: nothing of a run is there. done: summary.json records all `epochs`. resume: an epoch finished
    (checkpoints/last, or its copy left mid-swap). restart: the run started but no epoch finished, so nothing
    is resumable and it starts again from step 0 with its own config.yaml (the same steps are replayed).
    """
    run = Path(run)
    if not (run / CONFIG).is_file():
        return "new"
    summary = run / SUMMARY
    if summary.is_file() and read_json(summary, "run summary").get("epochs_completed") == epochs:
        return "done"
    last = checkpoint_dir(run, "last")
    if last.is_dir() or retired_path(last).is_dir():
        return "resume"
    return "restart"


def check_new_run_dir(run: Path) -> None:
    """A new run may go into a folder only if none of what it writes is there yet (nothing is overwritten)."""
    run = Path(run)
    present = [name for name in RUN_ENTRIES if (run / name).exists()]
    if (run / CONFIG).is_file():
        raise PeftlabError(f"{run} already holds a run. Fix: --resume {run} to continue it, or choose another --output-dir")
    if present:
        raise PeftlabError(f"{run} already has {', '.join(present)}, which a run would overwrite. "
                           "Fix: choose another --output-dir")


def recover_run(run: Path) -> list[str]:
    """Clean up after a killed process (see the module docstring); returns one line per repair, for the log."""
    run = Path(run)
    done = []
    for name in ("best", "last"):
        done += [f"{CHECKPOINTS}/{line}" for line in recover_directory(checkpoint_dir(run, name), ADAPTER_MARKER)]
    for folder, names in ((run, (CONFIG, METRICS, SUMMARY)), (run / PLOTS, ("loss.png", "accuracy.png"))):
        for name in names:  # temporary files of atomic writes that never got renamed into place
            for leftover in folder.glob(f".{name}.*"):
                if re.fullmatch(rf"\.{re.escape(name)}\.[A-Za-z0-9_]{{8}}", leftover.name):
                    leftover.unlink()
                    done.append(f"removed the unfinished {leftover.relative_to(run)}")
    return done


def check_last_checkpoint(last: Path) -> None:
    """checkpoints/last must be whole before a resume reads it; a missing file is named with the fix."""
    missing = [name for name in (ADAPTER_MARKER, *TRAINING_STATE_FILES) if not (last / name).is_file()]
    if missing:
        raise damaged_checkpoint(last, f"{', '.join(missing)} missing")


def damaged_checkpoint(last: Path, problem: str) -> PeftlabError:
    run = last.parent.parent
    return PeftlabError(f"{last} is damaged ({problem}), so the run cannot continue from it. Fix: move {last} away "
                        f"and `--resume {run}` again (it starts over from step 0 with the run's config.yaml), or "
                        "train into another --output-dir")
