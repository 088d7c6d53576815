"""The grid files in examples/ stay valid: each loads, names its runs, and every run's settings pass validation and
name a method that exists (a typo there would only show after an hour of training)."""

from pathlib import Path

import pytest

from peftlab.peft.methods import METHODS
from peftlab.commands.sweep import load_sweep
from peftlab.train import validate

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").rglob("*.yaml"))


@pytest.mark.parametrize("grid", EXAMPLES, ids=lambda path: path.name)
def test_example_grid_loads_and_every_run_is_valid(grid):
    folder, configs = load_sweep(str(grid), [], None)
    assert configs and folder.startswith("runs/")
    assert len({config.output_dir for config in configs}) == len(configs)
    for config in configs:
        validate(config)
        assert config.adapter.method in METHODS


def test_the_method_grids_cover_every_method_of_the_comparison():
    _, cola = load_sweep(str(Path(__file__).parent.parent / "examples" / "sweep-methods-cola.yaml"), [], None)
    assert [Path(config.output_dir).name for config in cola] == [
        "lora", "dora", "ia3", "houlsby", "pfeiffer", "prefix10", "prefix30", "head", "full"]
