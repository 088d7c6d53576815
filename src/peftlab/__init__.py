"""peftlab: parameter-efficient fine-tuning, instruction tuning, QA and distillation for GPT-2-class models.

Layers, from the bottom; a module imports only modules on its own floor or below, and never inside a function to
dodge that (tests/test_layers.py checks it). (1) Settings and data, light (no torch): errors, files, `settings`,
`sampling`, the model `catalog`, the datasets, recipes, `config` and the generated `options`, and the workload
`registry` with each workload's spec package (its settings section, its commands' names and command lines).
(2) Computation: models, the adapter methods (`peft`), `hf` export, the compute-once `cache`, shared prefixes,
decoding, tasks and their objectives, run directories, reports, the `engine` and trackers. (3) Workloads:
`workloads.base`, each workload's task and `Workload`, and `workloads.loading`, which builds a run through the
registry. (4) The run services, `train` (validate, build, fit, summarise) and `predict` (a trained run on one's
own inputs); they name no workload. (5) Orchestration:
`commands`: sweeps, the built-in commands' handlers and the commands a workload's spec registers (distillation's),
which run several runs or the run service; no workload package imports it. (6) `cli`: a table of commands whose
handlers are imported when they run.
"""

import importlib

from peftlab.errors import PeftlabError

__version__ = "0.1.0"

__all__ = ["PeftlabError", "__version__", "load_run"]

# Names of the heavier floors offered here, imported on first use so that `import peftlab` stays light.
_LAZY = {"load_run": "peftlab.predict"}


def __getattr__(name: str):
    """`peftlab.load_run(RUN_DIR, checkpoint="best")`: a trained run ready to `.predict(inputs)` (`peftlab.predict`)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'peftlab' has no attribute '{name}'")
    return getattr(importlib.import_module(_LAZY[name]), name)
