"""The course's parameter-count questions on GPT-2 small and medium (docs/course.md), printed as Markdown tables.

Counts depend only on shapes, so the models are built on PyTorch's meta device (no weights, no download, a second).
Run: `.venv/bin/python examples/course/gpt2_counts.py`. tests/test_course_counts.py checks these numbers against
hand-written formulas.
"""

from __future__ import annotations

import torch

from peftlab.models import load_model
from peftlab.peft.lora import apply_adapter_specs, apply_adapters
from peftlab.peft.prepare import apply_method, parameter_report
from peftlab.peft.targets import AdapterSpec, resolve_targets

# The LoRA SQuAD report's target sets on GPT-2 small, as peft's `target_modules` would name them.
SQUAD_TARGETS = {
    "attention (c_attn)": ["c_attn"],
    "attention + its projection (c_attn, attn.c_proj)": ["c_attn", "attn.c_proj"],
    "c_attn + every c_proj (peft's target_modules=['c_attn', 'c_proj'] also matches mlp.c_proj)": ["c_attn", "c_proj"],
}
SQUAD_RANKS = (4, 8, 16, 32)


def meta_model(name: str, task: str = "causal-lm"):
    with torch.device("meta"):
        model, _ = load_model(name, task=task, init="random")
    return model


def e0270_report(name: str):
    """E0 270 Problem 1: rank 4 on every block linear, LayerNorms and the classification head trainable."""
    model = meta_model(name, task="classification")
    apply_method(model, {"method": "lora", "targets": ["all-linear"], "rank": 4, "alpha": 64,
                         "extra_trainable": ["head", "norms"]})
    return parameter_report(model)


def separate_qkv_adapter_count(name: str, rank: int) -> tuple[int, int]:
    """(LoRA parameters, total) with q, k and v adapted as three separate projections (Homework 3's model): one
    LoRA per slice of GPT-2's fused c_attn, each A (r, d) and B (d, r)."""
    model = meta_model(name)
    fused = [AdapterSpec(spec.module, ("q", "k", "v")) for spec in resolve_targets(model, ["c_attn"])]
    apply_adapter_specs(model, fused, rank, alpha=4 * rank)
    report = parameter_report(model)
    return report.adapter, report.total


def fused_adapter_count(name: str, targets: list[str], rank: int) -> tuple[int, int]:
    """(LoRA parameters, total) of `--targets` on GPT-2 (q,k,v together = one LoRA on the whole c_attn)."""
    model = meta_model(name)
    apply_adapters(model, targets, rank, alpha=2 * rank)
    report = parameter_report(model)
    return report.adapter, report.total


def main() -> None:
    print("## E0 270 Problem 1: LoRA rank 4 on every block linear + LayerNorms + head (classifier)\n")
    print("| model | number of parameters | trainable | reduction |\n|---|---:|---:|---:|")
    for name in ("gpt2", "gpt2-medium"):
        report = e0270_report(name)
        print(f"| {name} | {report.total / 1e6:.2f}M | {report.trainable / 1e6:.2f}M ({report.trainable:,}) | "
              f"{report.reduction * 100:.2f}% |")
    print("\n## Homework 3 §5.1-5.2: LoRA r = 128 on q, k, v of GPT-2 medium (language model)\n")
    print("| q, k, v as | LoRA parameters | all parameters | % fine-tuned |\n|---|---:|---:|---:|")
    for label, (adapter, total) in (
            ("three separate projections (the homework's model)", separate_qkv_adapter_count("gpt2-medium", 128)),
            ("one fused c_attn (peftlab `--targets q,k,v`, peft `c_attn`)",
             fused_adapter_count("gpt2-medium", ["q", "k", "v"], 128))):
        print(f"| {label} | {adapter:,} | {total:,} | {100 * adapter / total:.2f}% |")
    print("\n## LoRA SQuAD report: LoRA parameters on GPT-2 small (language model) by rank and target set\n")
    print("| target set | " + " | ".join(f"r = {rank}" for rank in SQUAD_RANKS) + " |")
    print("|---|" + "---:|" * len(SQUAD_RANKS))
    for label, targets in SQUAD_TARGETS.items():
        counts = [fused_adapter_count("gpt2", targets, rank)[0] for rank in SQUAD_RANKS]
        print(f"| {label} | " + " | ".join(f"{count:,}" for count in counts) + " |")


if __name__ == "__main__":
    main()
