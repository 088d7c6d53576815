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
"""

from __future__ import annotations

import copy
import itertools
import re
from pathlib import Path

import yaml

from peftlab.config import RunConfig, set_dotted
from peftlab.errors import PeftlabError
from peftlab.fileio import read_text
from peftlab.report import print_report, write_report
from peftlab.runs import RunDir
from peftlab.train import train


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


def parse_assignment(option: str) -> tuple[str, object]:
    """'train.lr=3e-4' -> ('train.lr', '3e-4'); the value is read as a YAML scalar (so 16 is a number)."""
    key, separator, value = option.partition("=")
    if not separator or not key.strip() or not value:
        raise PeftlabError(f"--set {option!r}: expected SECTION.KEY=VALUE (e.g. train.lr=3e-4)")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        return key.strip(), value


def parse_set_option(option: str) -> tuple[str, list]:
    """'adapter.rank=16,128' -> ('adapter.rank', [16, 128]); values are read as YAML scalars."""
    key, separator, values = option.partition("=")
    if not separator or not key or not values:
        raise PeftlabError(f"--set {option!r}: expected KEY=V1,V2,... (e.g. adapter.rank=16,128)")
    return key.strip(), [yaml.safe_load(value) for value in values.split(",")]


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


def train_points(configs: list[RunConfig]) -> None:
    """Train each configured run unless it is done: new runs start, interrupted ones resume (or restart when no
    epoch finished); a folder holding a run of another configuration is an error. The one set of skip/resume
    rules for `peftlab sweep` and the distillation comparison."""
    for index, config in enumerate(configs, start=1):
        run = RunDir(config.output_dir)
        state = run.state(config.train.epochs)
        if state != "new":
            run.check_same_config(config)
        print(f"[{index}/{len(configs)}] {config.output_dir}: {'already done, skipped' if state == 'done' else state}",
              flush=True)
        if state != "done":
            train(config, resume=state != "new")


def run_sweep(path: str | None, sets: list[str] = (), output_dir: str | None = None) -> list[str]:
    """Train every grid point not done yet, then write <folder>/report.md and its plots (see `write_report`)."""
    folder, configs = load_sweep(path, list(sets), output_dir)
    print(f"sweep: {len(configs)} run(s) in {folder}")
    train_points(configs)
    run_dirs = [config.output_dir for config in configs]
    print_report(*write_report(run_dirs, folder))
    return run_dirs
