"""Experiment trackers (`--report-to tensorboard,wandb`) through Hugging Face Accelerate: per-step training loss,
learning rate, gradient norm, throughput and the task's own quantities (`StepOutput.sums`), and every
evaluation's metrics, under <run>/trackers.

Both trackers are optional extras (`pip install 'peftlab[tensorboard]'` / `'peftlab[wandb]'`), checked before the
model loads. W&B runs offline (nothing leaves the machine; `wandb sync` uploads later) unless an API key is set or
WANDB_MODE says otherwise.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from peftlab.engine import STEP_KEYS, Callback
from peftlab.errors import PeftlabError

TRACKER_NAMES = ("tensorboard", "wandb")
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb"}
# What Accelerate imports when the tracker starts (its TensorBoard tracker writes through torch's SummaryWriter).
TRACKER_IMPORTS = {"tensorboard": ("tensorboard", "torch.utils.tensorboard"), "wandb": ("wandb",)}


def check_trackers(names: list[str]) -> None:
    """Each tracker's package is installed and imports (before anything loads): a broken install is named now, not
    when the tracker starts at the first step."""
    for name in names:
        module = TRACKER_MODULES[name]
        if importlib.util.find_spec(module) is None:
            raise PeftlabError(f"--report-to {name}: the {name} package is not installed. Fix: pip install "
                               f"'peftlab[{name}]' (or .venv/bin/pip install {module})")
        try:
            for imported in TRACKER_IMPORTS[name]:
                importlib.import_module(imported)
        except Exception as error:  # noqa: BLE001 - whatever a broken install raises, named in one line
            reason = (str(error).strip().splitlines() or [""])[0]
            raise PeftlabError(f"--report-to {name}: the {module} package is installed but fails to import "
                               f"({type(error).__name__}: {reason}). Fix: reinstall it (.venv/bin/pip install "
                               f"--force-reinstall {module}) or drop --report-to {name}") from None


def wandb_offline_by_default() -> bool:
    """W&B without credentials would ask for a login or retry the network: run offline instead."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path.home() / ".netrc"  # where `wandb login` keeps the key
    return not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(encoding="utf-8", errors="replace"))


def flat_settings(config: dict, prefix: str = "") -> dict:
    """A nested config as flat "section.key" values a tracker can show (lists joined)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat |= flat_settings(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = ",".join(map(str, value)) if isinstance(value, list) else value
    return flat


class Trackers(Callback):
    """Starts the run's trackers on the first step and logs every step and evaluation (main process)."""

    def __init__(self, config):
        self.config, self.started = config, False

    def _start(self, engine) -> None:
        accelerator, config = engine.accelerator, self.config
        if "wandb" in config.train.report_to and wandb_offline_by_default():
            os.environ["WANDB_MODE"] = "offline"
            accelerator.print(f"W&B: offline (no API key); upload later with `wandb sync {engine.run.path}/trackers/wandb/"
                              "offline-run-*`")
        name = engine.run.path.name
        settings = {key: value for key, value in flat_settings(config.to_dict()).items() if value is not None}
        # The project is "peftlab" (TensorBoard: <run>/trackers/peftlab), each run named by its folder.
        accelerator.init_trackers("peftlab", config=settings, init_kwargs={
            "wandb": {"dir": str(engine.run.path / "trackers"), "name": name}})
        self.started = True

    def on_step(self, engine, row: dict) -> None:
        if not self.started:
            self._start(engine)
        values = {f"train/{key}": row[key] for key in ("loss", "lr", "grad_norm", "examples_per_second")}
        values |= {f"train/{key}": value for key, value in row.items() if key not in STEP_KEYS and value is not None}
        engine.accelerator.log(values | {"train/epoch": row["epoch"]}, step=row["step"])

    def on_evaluation(self, engine, row: dict) -> None:
        if not self.started:
            self._start(engine)
        values = {f"val/{key.removeprefix('val_')}": value for key, value in row.items()
                  if key.startswith("val_") and isinstance(value, (int, float)) and not isinstance(value, bool)}
        engine.accelerator.log(values, step=row["step"])

    def on_train_end(self, engine) -> None:
        if self.started:
            engine.accelerator.end_training()
            self.started = False
