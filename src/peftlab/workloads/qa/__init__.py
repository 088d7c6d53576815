"""Generative question answering (W4: SQuAD v1.1). No settings of its own; the task and workload (`workload`) are
imported when a run is built."""

from peftlab.workloads.registry import WorkloadSpec

SPEC = WorkloadSpec(name="qa", workload="peftlab.workloads.qa.workload:QAWorkload")
