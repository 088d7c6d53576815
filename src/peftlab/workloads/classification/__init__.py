"""Sequence classification (W1: LoRA on CoLA): a head on the last token. No settings of its own; the task and
workload (`workload`) are imported when a run is built."""

from peftlab.workloads.registry import WorkloadSpec

SPEC = WorkloadSpec(name="classification", workload="peftlab.workloads.classification.workload:ClassificationWorkload")
