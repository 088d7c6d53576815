"""Benchmark: seconds per training step and evaluation examples/s of every PEFT method on SmolLM2-135M, each next
to Hugging Face peft's implementation of the same method where peft has one (LoRA, DoRA, IA3, prefix tuning).

    .venv/bin/python bench/bench_methods.py [--quick] [--repeats N] [--batch-size B] [--seq-len T]

Every side gets the same base weights, the same random batch (16 x 48 tokens by default: CoLA/RT-like lengths) and
AdamW; a training step is forward + backward + optimizer step of a causal-LM loss. Evaluation is a no-grad forward
in eval mode, un-merged on both sides (peftlab's default evaluation, and how `PeftModel` runs them). All
measurements of one method are interleaved (ours, peft, peft, ours, ...) so drift in machine load hits both; the
table gives the median over repeats with the min–max spread. Raw samples go to bench/results/methods.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_lora import interleaved, make_forward, make_step  # noqa: E402

from peftlab.models import load_model, smollm2_cache_path  # noqa: E402
from peftlab.peft import apply_method, parameter_report  # noqa: E402

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = {  # name: (peftlab settings, peft config factory or None)
    "lora r16 all-linear": ({"method": "lora", "targets": ["all-linear"], "rank": 16, "alpha": 32},
                            lambda peft: peft.LoraConfig(r=16, lora_alpha=32, target_modules=ALL_LINEAR)),
    "dora r16 all-linear": ({"method": "dora", "targets": ["all-linear"], "rank": 16, "alpha": 32},
                            lambda peft: peft.LoraConfig(r=16, lora_alpha=32, target_modules=ALL_LINEAR,
                                                         use_dora=True)),
    "ia3 k+v+down": ({"method": "ia3", "targets": ["k", "v", "down"]},
                     lambda peft: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                 feedforward_modules=["down_proj"])),
    "houlsby m64": ({"method": "adapter", "adapter_size": 64}, None),
    "pfeiffer m64": ({"method": "adapter", "adapter_size": 64, "adapter_placement": "pfeiffer"}, None),
    "prefix p10": ({"method": "prefix", "prefix_length": 10},
                   lambda peft: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10)),
    "full": ({"method": "full"}, None),
}


def build(name: str, base, hf_base):
    """(ours, peft model or None, trainable parameters) for one method."""
    import peft

    settings, peft_config = METHODS[name]
    ours = copy.deepcopy(base)
    apply_method(ours, {"extra_trainable": [], **settings})
    theirs = peft.get_peft_model(copy.deepcopy(hf_base), peft_config(peft)) if peft_config else None
    return ours, theirs, parameter_report(ours).trainable


def summary(seconds: list[float]) -> str:
    return f"{statistics.median(seconds) * 1e3:.0f} ({min(seconds) * 1e3:.0f}–{max(seconds) * 1e3:.0f})"


def rate(seconds: list[float], batch: int) -> str:
    rates = sorted(batch / value for value in seconds)
    return f"{statistics.median(rates):.1f} ({rates[0]:.1f}–{rates[-1]:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 repeats, batch 4 x 16")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    parser.add_argument("--repeats", type=int, default=None, help="timed samples per measurement (default 3)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 16")
    parser.add_argument("--seq-len", type=int, default=None, help="default 48")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    repeats = args.repeats or (2 if args.quick else 3)
    batch_size, seq_len = args.batch_size or (4 if args.quick else 16), args.seq_len or (16 if args.quick else 48)
    iterations = 1 if args.quick else 2
    device = torch.device("cpu")
    torch.manual_seed(0)
    base, _ = load_model("smollm2-135m")
    hf_base = AutoModelForCausalLM.from_pretrained(smollm2_cache_path(), dtype=torch.float32)
    batch = torch.randint(0, base.config.vocab_size, (batch_size, seq_len))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, SmolLM2-135M, batch {batch_size} x {seq_len}, "
          f"{repeats} repeats x {iterations} iterations, interleaved per method\n")
    lines = ["| method | trainable | train step ms, peftlab | train step ms, HF peft | eval examples/s, peftlab | "
             "eval examples/s, HF peft |", "|---|---:|---:|---:|---:|---:|"]
    results = {"threads": torch.get_num_threads(), "batch": [batch_size, seq_len], "repeats": repeats,
               "iterations": iterations, "methods": {}}
    for name in [item.strip() for item in args.methods.split(",") if item.strip()]:
        ours, theirs, trainable = build(name, base, hf_base)
        sides = {"ours": ours} | ({"peft": theirs} if theirs is not None else {})
        for model in sides.values():
            model.train()
        steps = interleaved({side: make_step(model, batch) for side, model in sides.items()}, repeats, iterations,
                            device)
        for model in sides.values():
            model.eval()  # un-merged: merged evaluation is bench_merge_eval.py's subject
        forwards = interleaved({side: make_forward(model, batch) for side, model in sides.items()}, repeats,
                               iterations, device)
        results["methods"][name] = {"trainable": trainable, "train_step_seconds": steps, "eval_seconds": forwards}
        lines.append(f"| {name} | {trainable:,} | {summary(steps['ours'])} | "
                     f"{summary(steps['peft']) if 'peft' in steps else '—'} | {rate(forwards['ours'], batch_size)} | "
                     f"{rate(forwards['peft'], batch_size) if 'peft' in forwards else '—'} |")
        print(lines[-1], flush=True)
        del ours, theirs, sides
    print("\n" + "\n".join(lines))
    output = Path(__file__).parent / "results" / f"methods{'-quick' if args.quick else ''}.json"
    output.parent.mkdir(exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nraw samples: {output}")


if __name__ == "__main__":
    main()
