"""Plain-text causal language modelling (the DPO paper's SFT step: the policy learns the reviews themselves). No
settings of its own; the task and workload (`workload`) are imported when a run is built."""

from peftlab.workloads.registry import WorkloadSpec

SPEC = WorkloadSpec(name="lm", workload="peftlab.workloads.lm.workload:LanguageModelWorkload")
