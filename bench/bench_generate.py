"""Generation speed of peftlab vs plain transformers `generate` on SmolLM2-135M, side by side in one process, beside
this machine's decode bounds (bench_roofline.py: memory bandwidth and fp32 matmul rate, measured in the same run).

    .venv/bin/python bench/bench_generate.py [--repeats 5] [--new-tokens 64] [--weights fp16,int8]
    .venv/bin/python bench/bench_generate.py --profile [--new-tokens 32]

Both sides use the same fp32 weights (peftlab's cache) and greedy decoding, so they must produce the same text
(checked); the runs are interleaved (ours, plain, plain, ours, ...) so machine noise hits both alike. Prints
medians with the min-max spread, each side's share of the tighter bound, and writes bench/results/generate.json.

--profile: where one decode step's time goes (matrix products, attention, other operations, and the Python and
dispatch between them, from torch.profiler's self times), for the loop before the in-place cache
(bench_eval_generation.reference_decode), for peftlab.generation.decode with decode_step switched off (every step
through transformers' modules) and for decode as it is, at batch 1 and 8 (one decode of --new-tokens minus one of
a single token, so the prompt's forward pass is left out); writes bench/results/generate_profile.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from bench_eval_generation import reference_decode
from bench_roofline import decode_bounds, machine_limits, weight_footprint

import peftlab.generation
from peftlab.fileio import write_text_atomic
from peftlab.generate import generate
from peftlab.models import load_model, smollm2_cache_path
from peftlab.sampling import Sampling
from peftlab.weights import PackedLinear, pack_linear_layers

PROMPTS = [
    "The history of the printing press begins",
    "Here is a short story about a lighthouse keeper who",
    "The three most important ideas in economics are",
    "To bake bread at home, you first need to",
    "The city of Lisbon is known for",
    "A good scientific experiment should always",
    "When the train finally arrived at the station,",
    "The main difference between a virus and a bacterium is",
]
BATCHES = (1, 8)


def plain_transformers(cache: Path):
    """The peer: what a user of transformers writes by hand."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cache, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32).eval()
    return model, tokenizer


def run_plain(model, tokenizer, prompts: list[str], new_tokens: int) -> tuple[list[str], int]:
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    generated = output[:, batch["input_ids"].shape[1] :]
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    # Tokens actually produced: up to and including each row's first EOS.
    produced = 0
    for row in generated.tolist():
        produced += row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
    return texts, produced


def time_call(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def packed_read_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads from a model packed by `--weights`: its packed linear layers (2 or 1 byte per
    weight, not the fp32 layers they keep for wide passes) and its other parameters but the input embedding (a
    lookup of a few rows)."""
    packed = [module for module in model.modules() if isinstance(module, PackedLinear)]
    skipped = {id(parameter) for module in packed for parameter in module.parameters()}
    skipped.add(id(model.get_input_embeddings().weight))
    others = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters()
                 if id(parameter) not in skipped)
    return others + sum(module.in_features * module.out_features * WEIGHT_BYTES[module.weights] for module in packed)


WEIGHT_BYTES = {"fp16": 2, "int8": 1}


def compare(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    limits = machine_limits(args.repeats)
    ours_model, ours_tokenizer = load_model("smollm2-135m")
    plain_model, plain_tokenizer = plain_transformers(smollm2_cache_path())
    weight_bytes, weights = weight_footprint(ours_model)
    packed_models = {}  # --weights: "ours-int8" -> a packed copy of the model
    for kind in args.weights:
        packed_models[f"ours-{kind}"] = load_model("smollm2-135m")[0].eval()
        pack_linear_layers(packed_models[f"ours-{kind}"], kind)

    results = {"limits": limits, "weight_bytes": weight_bytes, "new_tokens": args.new_tokens,
               "repeats": args.repeats, "batches": {},
               "packed_read_bytes": {side: packed_read_bytes(model) for side, model in packed_models.items()}}
    for batch_size in BATCHES:
        prompts = PROMPTS[:batch_size]
        run_plain(plain_model, plain_tokenizer, prompts, 8)  # warm-up, every side
        for model in (ours_model, *packed_models.values()):
            generate(model, ours_tokenizer, prompts, Sampling(temperature=0, max_new_tokens=8))
        sides = {
            side: lambda prompts=prompts, model=model: [texts[0] for texts in generate(
                model, ours_tokenizer, prompts, Sampling(temperature=0, max_new_tokens=args.new_tokens))]
            for side, model in {"ours": ours_model, **packed_models}.items()}
        sides["plain"] = lambda prompts=prompts: run_plain(plain_model, plain_tokenizer, prompts, args.new_tokens)[0]
        produced = run_plain(plain_model, plain_tokenizer, prompts, args.new_tokens)[1]  # same for both (checked)
        rates = {side: [] for side in sides}
        same_text = {side: [] for side in packed_models}  # rows whose text equals fp32's, per repeat
        for repeat in range(args.repeats):
            names = list(sides)
            order = names[repeat % len(names):] + names[: repeat % len(names)]  # each side first in turn
            timed = {side: time_call(sides[side]) for side in order}  # side -> (seconds, texts)
            if timed["ours"][1] != timed["plain"][1]:
                raise SystemExit("peftlab and plain transformers produced different greedy text: the comparison is void")
            for side in sides:  # packed sides: tokens/s over the tokens fp32 produced (their lengths may differ)
                rates[side].append(produced / timed[side][0])
            for side in packed_models:
                same_text[side].append(sum(a == b for a, b in zip(timed[side][1], timed["ours"][1])))
        ratios = [ours / plain for ours, plain in zip(rates["ours"], rates["plain"])]
        results["batches"][batch_size] = {"ours_tokens_per_s": rates["ours"], "plain_tokens_per_s": rates["plain"],
                                          "ratio": ratios, **decode_bounds(weight_bytes, weights, batch_size, limits)}
        for side in packed_models:
            bytes_read = results["packed_read_bytes"][side]
            results["batches"][batch_size][side] = {
                "tokens_per_s": rates[side], "ratio_to_plain": [a / b for a, b in zip(rates[side], rates["plain"])],
                "same_text_rows": same_text[side], **decode_bounds(bytes_read, weights, batch_size, limits)}

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; smollm2-135m fp32 ({weight_bytes / 1e6:.0f} MB); "
          f"greedy, {args.new_tokens} new tokens (the prompt's forward pass included); {args.repeats} interleaved "
          f"repeats; median (min-max); identical text checked")
    print(f"this machine: memory read {limits['read_gb_s']:.1f} GB/s, fp32 matmul {limits['matmul_gflops']:.0f} GFLOP/s\n")
    print("| batch | peftlab tokens/s | transformers generate tokens/s | peftlab/transformers | bandwidth bound | "
          "compute bound | peftlab % of bound | transformers % of bound |")
    print("|---|---|---|---|---|---|---|---|")
    for batch_size, row in results["batches"].items():
        ratio, bound = row["ratio"], row["bound_tokens_per_s"]
        print(f"| {batch_size} | {spread(row['ours_tokens_per_s'])} | {spread(row['plain_tokens_per_s'])} | "
              f"{statistics.median(ratio):.2f} ({min(ratio):.2f}-{max(ratio):.2f}) | "
              f"{row['bandwidth_tokens_per_s']:.1f} | {row['compute_tokens_per_s']:.1f} | "
              f"{spread([100 * rate / bound for rate in row['ours_tokens_per_s']])} | "
              f"{spread([100 * rate / bound for rate in row['plain_tokens_per_s']])} |")
    for side, bytes_read in results["packed_read_bytes"].items():
        print(f"\n{side} (--weights {side[5:]}, {bytes_read / 1e6:.0f} MB read per step; tokens/s counted over the "
              "fp32 side's tokens):\n")
        print("| batch | tokens/s | against transformers generate | bandwidth bound | % of bound | rows with the fp32 "
              "text |")
        print("|---|---|---|---|---|---|")
        for batch_size, row in results["batches"].items():
            packed = row[side]
            print(f"| {batch_size} | {spread(packed['tokens_per_s'])} | {spread(packed['ratio_to_plain'])} | "
                  f"{packed['bandwidth_tokens_per_s']:.1f} | "
                  f"{spread([100 * rate / packed['bound_tokens_per_s'] for rate in packed['tokens_per_s']])} | "
                  f"{min(packed['same_text_rows'])}-{max(packed['same_text_rows'])} of {batch_size} |")
    out = Path(__file__).parent / "results" / "generate.json"
    write_text_atomic(out, json.dumps(results, indent=2))
    print(f"\nraw numbers: {out}")


# ----------------------------------------------------------------------------------------------------------
# --profile


PRODUCTS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addmv", "aten::mv"}


def op_seconds(run) -> dict[str, float]:
    """Seconds of one `run()` by kind of operation (torch.profiler's self time of each op): matrix products,
    attention (SDPA), every other operation; and what is left of the wall time: Python and dispatch between them."""
    with torch.profiler.profile() as profiler:
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
    seconds = {"matrix products": 0.0, "attention (SDPA)": 0.0, "other operations (norms, rotary, copies, ...)": 0.0}
    for event in profiler.key_averages():
        if event.key in PRODUCTS:
            part = "matrix products"
        elif "scaled_dot_product" in event.key:
            part = "attention (SDPA)"
        else:
            part = "other operations (norms, rotary, copies, ...)"
        seconds[part] += event.self_cpu_time_total / 1e6
    seconds["Python and dispatch between operations"] = wall - sum(seconds.values())
    seconds["total"] = wall
    return seconds


def step_profile(loop, model, prompts, new_tokens: int) -> dict[str, float]:
    """Milliseconds per decode step by part: (a decode of new_tokens) - (a decode of 1), over new_tokens - 1, so
    the prompt's forward pass is left out."""
    loop(model, prompts, 4, set(), 0)  # warm-up (and decode_step's packing)
    long, short = (op_seconds(lambda count=count: loop(model, prompts, count, set(), 0)) for count in (new_tokens, 1))
    return {part: 1e3 * (long[part] - short[part]) / (new_tokens - 1) for part in long}


def modules_only(model, prompts, new_tokens, stop_ids, pad_id):
    """generation.decode with every step through the model's modules (decode_step switched off): the loop as it
    was before decode_step."""
    original = peftlab.generation.decode_step
    peftlab.generation.decode_step = lambda model: None
    try:
        return peftlab.generation.decode(model, prompts, new_tokens, stop_ids, pad_id)
    finally:
        peftlab.generation.decode_step = original


def profile(args: argparse.Namespace) -> None:
    model, tokenizer = load_model("smollm2-135m")
    loops = {"reference_decode (commit e4c4b74)": reference_decode, "decode, modules only": modules_only,
             "decode with decode_step": peftlab.generation.decode}
    results = {}
    for batch_size in BATCHES:
        prompts = [tokenizer(prompt)["input_ids"] for prompt in PROMPTS[:batch_size]]
        for name, loop in loops.items():
            results[f"batch {batch_size}, {name}"] = step_profile(loop, model, prompts, args.new_tokens)
    parts = list(next(iter(results.values())))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; smollm2-135m fp32; greedy; ms per decode "
          f"step under torch.profiler ({args.new_tokens} new tokens minus 1; prompt forward excluded)\n")
    print("| part | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for part in parts:
        print(f"| {part} | " + " | ".join(f"{row[part]:.1f}" for row in results.values()) + " |")
    out = Path(__file__).parent / "results" / "generate_profile.json"
    write_text_atomic(out, json.dumps(results, indent=2))
    print(f"\nraw numbers: {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--profile", action="store_true", help="where a decode step's time goes, before and after")
    parser.add_argument("--weights", default="", help="also time packed copies (e.g. fp16,int8; `peftlab.weights`)")
    args = parser.parse_args()
    args.weights = [kind for kind in args.weights.split(",") if kind]
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be >= 2")
    (profile if args.profile else compare)(args)


if __name__ == "__main__":
    main()
