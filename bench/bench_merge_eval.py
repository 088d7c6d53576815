"""Benchmark: evaluation unmerged (peftlab's default) vs merged (`with merged(model):`, the seed's "eval() merges").

    .venv/bin/python bench/bench_merge_eval.py [--model smollm2-135m] [--batch-size 4] [--seq-len 32] [--repeats 5]

Each adapter below gets random factors (B != 0) on the same base model. Per repeat, interleaved (unmerged first on
even repeats, merged first on odd ones, so drift in machine load hits both): one no-grad forward in eval mode with
the adapter unmerged; the merge of every adapted weight (`merge_adapters`), one forward merged, the un-merge. The
table gives the median and min–max over repeats, and the break-even: how many batches one evaluation needs before
merging pays for its merge and un-merge, (merge + unmerge) / (unmerged forward - merged forward). `--model gpt2`
uses random weights (`init="random"`); smollm2-135m needs `make setup`. Raw samples: bench/results/merge_eval.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from peftlab.models import load_model
from peftlab.peft import adapter_state_dict, apply_method, merge_adapters, unmerge_adapters

ADAPTERS = {  # name: adapter section
    "lora r8 q+v": {"method": "lora", "targets": ["q", "v"], "rank": 8, "alpha": 16},
    "lora r8 all-linear": {"method": "lora", "targets": ["all-linear"], "rank": 8, "alpha": 16},
    "dora r8 all-linear": {"method": "dora", "targets": ["all-linear"], "rank": 8, "alpha": 16},
}
STEPS = ("unmerged forward", "merge", "merged forward", "unmerge")


def timed(function, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(model, batch: torch.Tensor, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each step in STEPS, `repeats` samples each, after one warm-up round."""
    forward = torch.inference_mode()(lambda: model(input_ids=batch))

    def unmerged() -> float:
        return timed(forward, device)

    def merged_round() -> tuple[float, float, float]:
        return timed(lambda: merge_adapters(model), device), timed(forward, device), \
            timed(lambda: unmerge_adapters(model), device)

    unmerged(), merged_round()
    samples: dict[str, list[float]] = {step: [] for step in STEPS}
    for repeat in range(repeats):
        if repeat % 2 == 0:
            samples["unmerged forward"].append(unmerged())
        merge, merged_forward, unmerge = merged_round()
        if repeat % 2 == 1:
            samples["unmerged forward"].append(unmerged())
        samples["merge"].append(merge)
        samples["merged forward"].append(merged_forward)
        samples["unmerge"].append(unmerge)
    return samples


def cell(seconds: list[float]) -> str:
    return f"{statistics.median(seconds) * 1e3:.1f} ({min(seconds) * 1e3:.1f}–{max(seconds) * 1e3:.1f})"


def break_even(samples: dict[str, list[float]]) -> str:
    median = {step: statistics.median(values) for step, values in samples.items()}
    saved = median["unmerged forward"] - median["merged forward"]
    cost = median["merge"] + median["unmerge"]
    return f"{cost / saved:.1f} batches" if saved > 0 else "never (merged is not faster)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (pretrained) or gpt2 (random weights)")
    parser.add_argument("--adapters", default=",".join(ADAPTERS), help=f"comma-separated, of: {', '.join(ADAPTERS)}")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed samples per step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    base, _ = load_model(args.model, init="random" if args.model == "gpt2" else "pretrained")
    batch = torch.randint(0, base.config.vocab_size, (args.batch_size, args.seq_len),
                          generator=torch.Generator().manual_seed(0)).to(device)
    print(f"torch {torch.__version__}, {args.model}, device {device}, threads {torch.get_num_threads()}, batch "
          f"{args.batch_size} x {args.seq_len}, {args.repeats} repeats, fp32; median (min–max) ms\n")
    print("| adapter | " + " | ".join(STEPS) + " | merging pays after |\n" + "|---" * (len(STEPS) + 2) + "|")
    results = {"model": args.model, "device": str(device), "threads": torch.get_num_threads(),
               "batch": [args.batch_size, args.seq_len], "adapters": {}}
    for name in [item.strip() for item in args.adapters.split(",") if item.strip()]:
        model = copy.deepcopy(base)
        apply_method(model, {**ADAPTERS[name], "extra_trainable": []})
        torch.manual_seed(0)
        with torch.no_grad():
            for tensor in adapter_state_dict(model).values():
                tensor.add_(torch.randn_like(tensor) * 0.02)  # B != 0: a merge that changes the weights
        model.to(device).eval()
        samples = measure(model, batch, args.repeats, device)
        results["adapters"][name] = samples
        print(f"| {name} | " + " | ".join(cell(samples[step]) for step in STEPS) + f" | {break_even(samples)} |")
        del model
    out = Path(__file__).parent / "results" / "merge_eval.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nraw samples: {out}")


if __name__ == "__main__":
    main()
