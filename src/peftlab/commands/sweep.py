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

A point that fails does not stop the sweep (unless `--stop-on-error`): its error is printed on one line naming the
point, the other points train, the report marks the run as failed, and the sweep ends with a summary of the
failures and exit code 2. Ctrl-C stops the sweep (exit 130) and says the command that goes on where it stopped.

`--backend ray` runs the points as Ray Tune trials (the optional extra `peftlab[ray]`): on the cluster at
`--address`, else on a local Ray that peftlab starts and stops. Same run directories, same skip/resume rules, same
report; each evaluation is reported to Tune (`val_loss`, the task's metrics, `step`). Trials run in another working
directory, so every path-like setting of a point (`absolute_paths`) is made absolute against the sweep's own.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import os
import re
import shlex
import sys
from pathlib import Path

import yaml

from peftlab.catalog import KNOWN_MODELS
from peftlab.config import RunConfig, load_config, same_run, set_dotted, split_assignment, yaml_scalar
from peftlab.errors import Interrupted, PeftlabError
from peftlab.fileio import read_text
from peftlab.report import print_report, write_report
from peftlab.runs import CONFIG, RunDir
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


PATH_SUFFIXES = ("_dir", "_file", "_path")  # settings named so hold paths (task.data_dir, distill.transfer_file)
PATH_SETTINGS = {"teacher"}  # and these (distill.teacher: a run directory)


def _absolute(value: str, base: Path) -> str:
    return os.path.normpath(base / os.path.expanduser(value))


def absolute_paths(config: RunConfig, base: str | Path | None = None) -> RunConfig:
    """A copy of `config` whose path-like settings are absolute, resolved against `base` (default: the working
    directory): output_dir, every setting of any section named *_dir, *_file, *_path or teacher, a model name that
    is no known model but a local directory, and any other relative value with a "/" that names an existing file or
    folder. Ray trials run in another working directory; what a relative path meant must not change there."""
    base = Path.cwd() if base is None else Path(base)
    values = config.to_dict()
    values["output_dir"] = _absolute(values["output_dir"], base)
    for section, settings in values.items():
        if not isinstance(settings, dict) or section == "environment":
            continue
        for key, value in settings.items():
            if not isinstance(value, str) or not value or os.path.isabs(os.path.expanduser(value)):
                continue
            if section == "model" and key == "name":
                path = value not in KNOWN_MODELS and (base / value).is_dir()
            else:
                path = (key.endswith(PATH_SUFFIXES) or key in PATH_SETTINGS
                        or ("/" in value and (base / os.path.expanduser(value)).exists()))
            if path:
                settings[key] = _absolute(value, base)
    return RunConfig.from_dict(values)


def _check_same_config(run: RunDir, config: RunConfig) -> None:
    """`RunDir.check_same_config`, where a run started on Ray (absolute paths) matches its grid point (relative)."""
    if not same_run(load_config(run.path / CONFIG), absolute_paths(config)):
        run.check_same_config(config)


def points_to_train(configs: list[RunConfig]) -> list[tuple[RunConfig, str]]:
    """Each configured run that is not done, with its state (new, restart or resume); a folder holding a run of
    another configuration is an error. The one set of skip/resume rules for every backend and the distillation
    comparison."""
    todo = []
    for index, config in enumerate(configs, start=1):
        run = RunDir(config.output_dir)
        state = run.state(config.train.epochs)
        if state != "new":
            _check_same_config(run, config)
        print(f"[{index}/{len(configs)}] {config.output_dir}: {'already done, skipped' if state == 'done' else state}",
              flush=True)
        if state != "done":
            todo.append((config, state))
    return todo


def train_points(configs: list[RunConfig], command: str | None = None) -> None:
    """Train each configured run unless it is done (`points_to_train`), one after the other; `command`: the
    command line that started them, recorded in each run's config.yaml."""
    for config, state in points_to_train(configs):
        train(config, resume=state != "new", command=command)


def error_line(error: BaseException) -> str:
    """An error in one line: our own message, or the exception's type and message (a Ray trial's error: its
    cause's)."""
    cause = getattr(error, "cause", None)  # ray.exceptions.RayTaskError: the exception raised in the trial
    if isinstance(cause, BaseException) and cause is not error:
        error = cause
    text = " ".join(str(error).split())
    line = text if isinstance(error, PeftlabError) and text else f"{type(error).__name__}: {text}".rstrip(": ")
    return line if len(line) <= 400 else line[:399] + "…"


def _say_failed(config: RunConfig, line: str) -> None:
    print(f"sweep: point {Path(config.output_dir).name} failed ({config.output_dir}): {line}", file=sys.stderr,
          flush=True)


def train_points_keep_going(configs: list[RunConfig], stop_on_error: bool = False,
                            command: str | None = None) -> dict[str, str]:
    """Like `train_points`, but a failing point is named in one line as it fails and the next one trains (with
    `stop_on_error`: the sweep stops there); returns {output_dir: error line} of the points that failed. A Ctrl-C
    is not a failure: it stops the sweep."""
    failures = {}
    for config, state in points_to_train(configs):
        try:
            train(config, resume=state != "new", command=command)
        except (Interrupted, KeyboardInterrupt):
            raise
        except Exception as error:  # noqa: BLE001 - any point's failure, a bug included, must not stop the others
            failures[config.output_dir] = error_line(error)
            _say_failed(config, failures[config.output_dir])
            if stop_on_error:
                break
    return failures


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
    train(config, resume=point["state"] != "new", command=point["command"], callbacks=[ReportToTune()])


def train_points_on_ray(configs: list[RunConfig], folder: str, address: str | None, cpus_per_trial: float,
                        gpus_per_trial: float, stop_on_error: bool = False, command: str | None = None
                        ) -> dict[str, str]:
    """The points not done yet as Ray Tune trials, at most as many at once as the resources allow; returns
    {output_dir: error line} of the trials that failed. Raises `Interrupted` when Tune stopped before every trial
    ended (Ctrl-C: Tune catches it, stops the trials and returns)."""
    if importlib.util.find_spec("ray") is None:
        raise PeftlabError("--backend ray needs Ray Tune. Fix: pip install 'peftlab[ray]'")
    import ray
    from ray import tune

    todo = points_to_train(configs)
    if not todo:
        return {}
    points = []
    for config, state in todo:  # trials run in their own working directory: paths must not be relative
        points.append({"config": absolute_paths(config).to_dict(), "state": state, "command": command,
                       "name": Path(config.output_dir).name, "output_dir": config.output_dir})
    environment = {name: _absolute(os.environ[name], Path.cwd())
                   for name in ("PEFTLAB_DATA", "PEFTLAB_CACHE", "PEFTLAB_MODELS", "HF_HOME") if os.environ.get(name)}
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
            run_config=tune.RunConfig(name="tune", storage_path=str((Path(folder) / ".ray").resolve()), verbose=0,
                                      failure_config=tune.FailureConfig(fail_fast=stop_on_error)),
        )
        results = tuner.fit()
    finally:
        if started_here:
            ray.shutdown()
    return ray_failures(results, points, stop_on_error)


def ray_failures(results, points: list[dict], stop_on_error: bool = False) -> dict[str, str]:
    """{output_dir: error line} of the failed trials of Tune's `results`, each named on stderr. `Interrupted` when
    Tune was stopped (Ctrl-C: Tune catches it, ends the trials and returns as if they were done): a trial that
    neither failed nor left a finished run, or one stopped by a Ctrl-C of its own; not when --stop-on-error stopped
    the others after a failure."""
    failures, interrupted = {}, []
    for result in results:
        point = result.config["point"]
        if not result.error:
            continue
        if isinstance(getattr(result.error, "cause", result.error), (Interrupted, KeyboardInterrupt)):
            interrupted.append(point["name"])
            continue
        failures[point["output_dir"]] = error_line(result.error)
        print(f"sweep: point {point['name']} failed ({point['output_dir']}): {failures[point['output_dir']]}",
              file=sys.stderr, flush=True)
    if stop_on_error and failures:
        return failures
    interrupted += [point["name"] for point in points if point["output_dir"] not in failures
                    and point["name"] not in interrupted
                    and RunDir(point["output_dir"]).state(point["config"]["train"]["epochs"]) != "done"]
    if interrupted:
        raise Interrupted(f"Ray Tune stopped {len(interrupted)} of {len(points)} trial(s) before they ended "
                          f"({', '.join(interrupted)})")
    return failures


def sweep_command(path: str | None, sets: list[str], output_dir: str | None, backend: str, address: str | None,
                  cpus_per_trial: float, gpus_per_trial: float, stop_on_error: bool) -> str:
    """The `peftlab sweep` command line of these arguments: the one that goes on where a sweep stopped."""
    words = ["peftlab", "sweep", *([path] if path else [])]
    words += [word for option in sets for word in ("--set", option)]
    words += ["--output-dir", output_dir] if output_dir else []
    if backend != "local":
        words += ["--backend", backend, *(["--address", address] if address else []),
                  "--cpus-per-trial", f"{cpus_per_trial:g}", "--gpus-per-trial", f"{gpus_per_trial:g}"]
    return shlex.join(words + (["--stop-on-error"] if stop_on_error else []))


def run_sweep(path: str | None, sets: list[str] = (), output_dir: str | None = None, backend: str = "local",
              address: str | None = None, cpus_per_trial: float = 1, gpus_per_trial: float = 0,
              stop_on_error: bool = False, command: str | None = None) -> list[str]:
    """Train every grid point not done yet (one after the other, or as Ray Tune trials), then write
    <folder>/report.md and its plots (see `write_report`).

    A failing point is named as it fails and the others still train (with `stop_on_error` the sweep stops at the
    first); the report marks it, and a `PeftlabError` naming every failed point ends the sweep. A Ctrl-C raises
    `Interrupted` with `command` (default: the equivalent `peftlab sweep` line), which goes on where it stopped."""
    command = command or sweep_command(path, list(sets), output_dir, backend, address, cpus_per_trial, gpus_per_trial,
                                       stop_on_error)
    if backend not in BACKENDS:
        raise PeftlabError(f"unknown --backend '{backend}': expected {' or '.join(BACKENDS)}")
    if backend == "local" and (address or gpus_per_trial):
        raise PeftlabError("--address and --gpus-per-trial are settings of --backend ray")
    if cpus_per_trial <= 0 or gpus_per_trial < 0:
        raise PeftlabError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
    folder, configs = load_sweep(path, list(sets), output_dir)
    print(f"sweep: {len(configs)} run(s) in {folder}{' on Ray Tune' if backend == 'ray' else ''}")
    try:
        if backend == "ray":
            failures = train_points_on_ray(configs, folder, address, cpus_per_trial, gpus_per_trial, stop_on_error,
                                           command)
        else:
            failures = train_points_keep_going(configs, stop_on_error, command)
    except (Interrupted, KeyboardInterrupt) as error:
        stopped = f"{str(error).rstrip('.')}. " if isinstance(error, Interrupted) and str(error) else ""
        raise Interrupted(f"the sweep stopped. {stopped}Finished runs are kept, unfinished ones resume from their last "
                          f"checkpoint. To go on: {command}") from None
    run_dirs = [config.output_dir for config in configs]
    started = [run_dir for run_dir in run_dirs if (Path(run_dir) / CONFIG).is_file()]
    if started:
        print_report(*write_report(started, folder, failures))
    if failures:
        lines = "".join(f"\n  {Path(run_dir).name} ({run_dir}): {line}" for run_dir, line in failures.items())
        not_run = len(run_dirs) - len(started)
        raise PeftlabError(f"{len(failures)} of {len(configs)} point(s) failed:{lines}\n"
                           + (f"{not_run} point(s) were not started (--stop-on-error). " if stop_on_error and not_run
                              else "")
                           + f"Their run directories keep what was saved. To retry them: {command}")
    return run_dirs


def run_sweep_command(args) -> None:
    """`peftlab sweep`'s arguments (see cli.py) as a `run_sweep` call."""
    if not args.grid and not args.set:
        raise PeftlabError("nothing to sweep: give a grid file and/or --set KEY=V1,V2")
    run_sweep(args.grid, args.set, args.output_dir, args.backend, args.address, args.cpus_per_trial, args.gpus_per_trial,
              getattr(args, "stop_on_error", False), getattr(args, "command_line", None))
