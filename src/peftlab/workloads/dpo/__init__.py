"""Direct preference optimisation (W7): the `dpo` settings section and the workload's spec. The task (`task`), the
reference (`reference`) and the workload (`workload`) are imported only when a run is built.

A DPO run trains the `preferences` task (its only objective is dpo): `peftlab train --objective dpo
--preferences FILE_OR_DIR`.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.settings import setting
from peftlab.workloads.registry import WorkloadSpec

REFERENCES = ("auto",)


@dataclass
class DPOConfig:
    """DPO's own settings: the pairs, the loss and its reference."""

    preferences: str | None = setting(None, "dpo: the preference pairs, a JSONL file or a folder with train.jsonl (and "
                                      "validation.jsonl; without it the prompts ordered by the sha256 of their text, "
                                      "the first tenth, at least 1, are held out with all their pairs)",
                                      default_text="--data-dir's preferences/ folder")
    beta: float = setting(0.1, "dpo: β, the strength of the KL penalty against the reference (loss -log σ(β·Δ))")
    label_smoothing: float = setting(0.0, "dpo: ε of conservative DPO, the share of pairs assumed flipped: "
                                     "-(1-ε)·log σ(βΔ) - ε·log σ(-βΔ); 0 = plain DPO")
    reference: str = setting("auto", "dpo: the reference model: auto = the --init-from run's adapter, frozen, when "
                             "given, else this model with its adapter disabled")
    min_score_gap: float = setting(0.0, "dpo: train only on pairs whose chosen_score - rejected_score is at least "
                                   "this (pairs whose reward barely differs teach little but noise); validation "
                                   "keeps every pair; 0 = every pair")
    precompute_reference: bool = setting(False, "dpo: compute the reference log-probs of every pair once, into "
                                         "RUN/cache (recomputed when the model, the reference or the data change)")


SPEC = WorkloadSpec(
    name="dpo",
    workload="peftlab.workloads.dpo.workload:DPOWorkload",
    settings=DPOConfig,
)
