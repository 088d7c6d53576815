"""Workloads: one package per kind of training, each declaring a `registry.WorkloadSpec` in its light `__init__`
(settings section, commands, the "module:Class" of its `base.Workload`). This module registers the built-in
ones; a workload from elsewhere calls `registry.register_workload` itself. `loading` builds a run's task and model
through the registry; no module outside a workload's package names it.
"""

from peftlab.workloads import classification, distill, dpo, icl, instruct, lm, qa
from peftlab.workloads.registry import register_workload

for _package in (classification, instruct, qa, distill, icl, lm, dpo):
    register_workload(_package.SPEC)
