"""`peftlab sweep`: a grid of training runs, then one comparison table, an overlaid validation-loss plot and a plot
of score against trainable parameters.

A grid file (YAML):

    output_dir: runs/sweep-rt            # run <name> goes to <output_dir>/<name>
    base:                                # a run configuration, as in a run's config.yaml (output_dir excluded)
      task: {name: rotten_tomatoes}
      train: {epochs: 1}
    grid:                                # the cross product of the axes
      setting:                           # an axis of mappings sets several keys together ...
        - {adapter.rank: 16, adapter.alpha: 64}
        - {name: full, adapter.method: full, train.lr: 5.0e-5}   # `name`: the point's run name (optional)
      train.seed: [0, 1]                 # ... an axis named by a key takes plain values

`--set KEY=V1,V2` adds an axis from the command line. Finished runs (summary.json present, all epochs done)
are skipped, interrupted ones resumed, so a sweep can be re-run after a crash or extended with new values.

`--backend ray` runs the points as Ray Tune trials (the optional extra `peftlab[ray]`): on the cluster at
`--address`, else on a local Ray that peftlab starts and stops. Same run directories, same skip/resume rules, same
report; each evaluation is reported to Tune (`val_loss`, the task's metrics, `step`).
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import os
import re
from pathlib import Path

import yaml

from peftlab.config import RunConfig, set_dotted, split_assignment, yaml_scalar
from peftlab.errors import PeftlabError
from peftlab.fileio import read_text
from peftlab.report import print_report, write_report
from peftlab.runs import RunDir
from peftlab.engine import Callback
from peftlab.train import train

BACKENDS = ("local", "ray")


def _label(value) -> str:
    if isinstance(value, dict):
        return "-".join(f"{key.rsplit('.', 1)[-1]}{_label(item)}" for key, item in value.items())
    if isinstance(value, list):
        return "+".join(_label(item) for item in value)
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", str(value))


def expand_grid(grid: dict) -> list[tuple[str, dict]]:
    """(run name, {dotted key: value}) for every point of the grid's cross product."""
    if not isinstance(grid, dict) or not grid:
        raise PeftlabError("grid: expected a mapping of axes (e.g. adapter.rank: [8, 16])")
    axes = []
    for axis, values in grid.items():
        if not isinstance(values, list) or not values:
            raise PeftlabError(f"grid.{axis}: expected a non-empty list of values")
        points = []
        for value in values:
            if isinstance(value, dict):
                setting = dict(value)
                name = setting.pop("name", None)  # a point may name itself; else its settings name it
                points.append((_label(name) if name is not None else _label(setting), setting))
            else:
                points.append((f"{axis.rsplit('.', 1)[-1]}{_label(value)}", {axis: value}))
        axes.append(points)
    runs = []
    for combination in itertools.product(*axes):
        name = "_".join(label for label, _ in combination)
        settings = {key: value for _, setting in combination for key, value in setting.items()}
        runs.append((name, settings))
    names = [name for name, _ in runs]
    if len(set(names)) != len(names):
        raise PeftlabError(f"grid: two points get the same run name ({names}); make the values distinct")
    return runs


def run_configs(base: RunConfig, output_dir: str, grid: dict) -> list[RunConfig]:
    configs = []
    for name, settings in expand_grid(grid):
        values = copy.deepcopy(base.to_dict())
        for key, value in settings.items():
            set_dotted(values, key, value, f"grid point {name}")
        values["output_dir"] = str(Path(output_dir) / name)
        configs.append(RunConfig.from_dict(values))
    return configs


def parse_set_option(option: str) -> tuple[str, list]:
    """'adapter.rank=16,128' -> ('adapter.rank', [16, 128]): an axis of the grid, its values read as YAML scalars."""
    key, values = split_assignment(option, "KEY=V1,V2,... (e.g. adapter.rank=16,128)")
    return key, [yaml_scalar(value) for value in values.split(",")]


def load_sweep(path: str | None, sets: list[str], output_dir: str | None) -> tuple[str, list[RunConfig]]:
    """The sweep's output folder and its run configurations, from a grid file and/or --set options."""
    spec = {}
    if path:
        try:
            spec = yaml.safe_load(read_text(Path(path), "grid file")) or {}
        except yaml.YAMLError as error:
            raise PeftlabError(f"{path}: not valid YAML: {error}") from None
        unknown = set(spec) - {"output_dir", "base", "grid"}
        if unknown:
            raise PeftlabError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; expected output_dir, base, grid")
    base_values = spec.get("base") or {}
    if "output_dir" in base_values:
        raise PeftlabError(f"{path}: base.output_dir is set per run; put the sweep's folder in output_dir")
    base = RunConfig.from_dict(base_values)
    grid = dict(spec.get("grid") or {})
    for option in sets:
        key, values = parse_set_option(option)
        grid[key] = values
    folder = output_dir or spec.get("output_dir")
    if not folder:
        raise PeftlabError("the sweep needs a folder for its runs: output_dir in the grid file, or --output-dir")
    return folder, run_configs(base, folder, grid)


def points_to_train(configs: list[RunConfig]) -> list[tuple[RunConfig, str]]:
    """Each configured run that is not done, with its state (new, restart or resume); a folder holding a run of
    another configuration is an error. The one set of skip/resume rules for every backend and the distillation
    comparison."""
    todo = []
    for index, config in enumerate(configs, start=1):
        run = RunDir(config.output_dir)
        state = run.state(config.train.epochs)
        if state != "new":
            run.check_same_config(config)
        print(f"[{index}/{len(configs)}] {config.output_dir}: {'already done, skipped' if state == 'done' else state}",
              flush=True)
        if state != "done":
            todo.append((config, state))
    return todo


def train_points(configs: list[RunConfig]) -> None:
    """Train each configured run unless it is done (`points_to_train`), one after the other."""
    for config, state in points_to_train(configs):
        train(config, resume=state != "new")


class ReportToTune(Callback):
    """Every evaluation of a trial, as a Tune result."""

    def on_evaluation(self, engine, row: dict) -> None:
        from ray import tune

        values = {key: value for key, value in row.items()
                  if isinstance(value, (int, float)) and not isinstance(value, bool)}
        tune.report(values)


def _tune_trial(trial: dict) -> None:
    """One Ray Tune trial: a grid point trained (or resumed) in its own run directory."""
    point = trial["point"]
    config = RunConfig.from_dict(point["config"])
    train(config, resume=point["state"] != "new", callbacks=[ReportToTune()])


def train_points_on_ray(configs: list[RunConfig], folder: str, address: str | None, cpus_per_trial: float,
                        gpus_per_trial: float) -> None:
    """The points not done yet as Ray Tune trials, at most as many at once as the resources allow."""
    if importlib.util.find_spec("ray") is None:
        raise PeftlabError("--backend ray needs Ray Tune. Fix: pip install 'peftlab[ray]'")
    import ray
    from ray import tune

    todo = points_to_train(configs)
    if not todo:
        return
    points = []
    for config, state in todo:  # trials run in their own working directory: paths must not be relative
        values = config.to_dict() | {"output_dir": str(Path(config.output_dir).resolve())}
        points.append({"config": values, "state": state, "name": Path(config.output_dir).name})
    environment = {name: os.environ[name] for name in ("PEFTLAB_DATA", "PEFTLAB_CACHE", "PEFTLAB_MODELS", "HF_HOME")
                   if name in os.environ}
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": environment} if environment else None)
    try:
        tuner = tune.Tuner(
            tune.with_resources(_tune_trial, {"cpu": cpus_per_trial, "gpu": gpus_per_trial}),
            param_space={"point": tune.grid_search(points)},
            tune_config=tune.TuneConfig(trial_name_creator=lambda trial: trial.config["point"]["name"],
                                        trial_dirname_creator=lambda trial: trial.config["point"]["name"]),
            # Tune's own tables would print every setting of every trial; the trials' logs say what happens.
            run_config=tune.RunConfig(name="tune", storage_path=str((Path(folder) / ".ray").resolve()), verbose=0),
        )
        results = tuner.fit()
    finally:
        if started_here:
            ray.shutdown()
    failed = [result for result in results if result.error]
    if failed:
        names = ", ".join(result.config["point"]["name"] for result in failed)
        raise PeftlabError(f"{len(failed)} of {len(points)} Ray trial(s) failed ({names}): {failed[0].error}. Their run "
                           "directories keep what was saved; run the sweep again to resume them")


def run_sweep(path: str | None, sets: list[str] = (), output_dir: str | None = None, backend: str = "local",
              address: str | None = None, cpus_per_trial: float = 1, gpus_per_trial: float = 0) -> list[str]:
    """Train every grid point not done yet (one after the other, or as Ray Tune trials), then write
    <folder>/report.md and its plots (see `write_report`)."""
    if backend not in BACKENDS:
        raise PeftlabError(f"unknown --backend '{backend}': expected {' or '.join(BACKENDS)}")
    if backend == "local" and (address or gpus_per_trial):
        raise PeftlabError("--address and --gpus-per-trial are settings of --backend ray")
    if cpus_per_trial <= 0 or gpus_per_trial < 0:
        raise PeftlabError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
    folder, configs = load_sweep(path, list(sets), output_dir)
    print(f"sweep: {len(configs)} run(s) in {folder}{' on Ray Tune' if backend == 'ray' else ''}")
    if backend == "ray":
        train_points_on_ray(configs, folder, address, cpus_per_trial, gpus_per_trial)
    else:
        train_points(configs)
    run_dirs = [config.output_dir for config in configs]
    print_report(*write_report(run_dirs, folder))
    return run_dirs


def run_sweep_command(args) -> None:
    """`peftlab sweep`'s arguments (see cli.py) as a `run_sweep` call."""
    if not args.grid and not args.set:
        raise PeftlabError("nothing to sweep: give a grid file and/or --set KEY=V1,V2")
    run_sweep(args.grid, args.set, args.output_dir, args.backend, args.address, args.cpus_per_trial, args.gpus_per_trial)
