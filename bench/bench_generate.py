"""Generation speed of peftlab vs plain transformers `generate` on SmolLM2-135M, side by side in one process, beside
this machine's decode bounds (bench_roofline.py: memory bandwidth and fp32 matmul rate, measured in the same run).

    .venv/bin/python bench/bench_generate.py [--repeats 5] [--new-tokens 64]
    .venv/bin/python bench/bench_generate.py --profile [--new-tokens 32]

Both sides use the same fp32 weights (peftlab's cache) and greedy decoding, so they must produce the same text
(checked); the runs are interleaved (ours, plain, plain, ours, ...) so machine noise hits both alike. Prints
medians with the min-max spread, each side's share of the tighter bound, and writes bench/results/generate.json.

--profile: where one decode step's time goes (attention, MLP, the rest of the transformer body, the output
projection, picking the token, and the loop's own overhead), for the loop before the in-place cache
(bench_eval_generation.reference_decode) and for peftlab.generation.decode, at batch 1 and 8: each part timed
around its modules with perf_counter (one decode of --new-tokens minus one of a single token, so the prompt's
forward pass is left out); writes bench/results/generate_profile.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from bench_eval_generation import reference_decode
from bench_roofline import decode_bounds, machine_limits, weight_footprint

import peftlab.generation
from peftlab.fileio import write_text_atomic
from peftlab.generate import generate
from peftlab.models import load_model, smollm2_cache_path
from peftlab.sampling import Sampling

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


def compare(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    limits = machine_limits(args.repeats)
    ours_model, ours_tokenizer = load_model("smollm2-135m")
    plain_model, plain_tokenizer = plain_transformers(smollm2_cache_path())
    weight_bytes, weights = weight_footprint(ours_model)

    results = {"limits": limits, "weight_bytes": weight_bytes, "new_tokens": args.new_tokens,
               "repeats": args.repeats, "batches": {}}
    for batch_size in BATCHES:
        prompts = PROMPTS[:batch_size]
        run_plain(plain_model, plain_tokenizer, prompts, 8)  # warm-up, both sides
        generate(ours_model, ours_tokenizer, prompts, Sampling(temperature=0, max_new_tokens=8))
        sides = {
            "ours": lambda prompts=prompts: [texts[0] for texts in generate(
                ours_model, ours_tokenizer, prompts, Sampling(temperature=0, max_new_tokens=args.new_tokens))],
            "plain": lambda prompts=prompts: run_plain(plain_model, plain_tokenizer, prompts, args.new_tokens)[0],
        }
        produced = run_plain(plain_model, plain_tokenizer, prompts, args.new_tokens)[1]  # same for both (checked)
        ours_rates, plain_rates = [], []
        for repeat in range(args.repeats):
            order = ("ours", "plain") if repeat % 2 == 0 else ("plain", "ours")
            timed = {side: time_call(sides[side]) for side in order}  # side -> (seconds, texts)
            if timed["ours"][1] != timed["plain"][1]:
                raise SystemExit("peftlab and plain transformers produced different greedy text: the comparison is void")
            ours_rates.append(produced / timed["ours"][0])
            plain_rates.append(produced / timed["plain"][0])
        ratios = [ours / plain for ours, plain in zip(ours_rates, plain_rates)]
        results["batches"][batch_size] = {"ours_tokens_per_s": ours_rates, "plain_tokens_per_s": plain_rates,
                                          "ratio": ratios, **decode_bounds(weight_bytes, weights, batch_size, limits)}

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
    out = Path(__file__).parent / "results" / "generate.json"
    write_text_atomic(out, json.dumps(results, indent=2))
    print(f"\nraw numbers: {out}")


# ----------------------------------------------------------------------------------------------------------
# --profile


class PartTimer:
    """Seconds spent inside modules, by part name, accumulated through forward pre/post hooks."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.running: set[str] = set()  # parts being timed by timed_function now
        self._started: dict[int, float] = {}

    def watch(self, module: torch.nn.Module, part: str) -> list:
        def before(module, args):
            self._started[id(module)] = time.perf_counter()

        def after(module, args, output):
            self.add(part, time.perf_counter() - self._started.pop(id(module)))

        return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def add(self, part: str, seconds: float) -> None:
        self.seconds[part] = self.seconds.get(part, 0.0) + seconds


@contextmanager
def instrumented(model, timer: PartTimer, reference: bool):
    """Hooks on attention, MLP and the body; the output projection and the pick timed where each loop does them:
    for the reference loop, its model's lm_head module and a timed greedy `pick_next`; for ours,
    `generation.project` / `project_for_argmax` and `generation.choose` (ours bypasses the lm_head module, and would
    run the whole model if it carried a hook; and greedy decoding without `pick_next` is its argmax path)."""
    body = model.base_model
    handles = timer.watch(body, "body")
    for layer in body.layers:
        handles += timer.watch(layer.self_attn, "attention") + timer.watch(layer.mlp, "mlp")
    patched = {}
    if reference:
        handles += timer.watch(model.get_output_embeddings(), "output projection")
    else:
        for name, part in (("project", "output projection"), ("project_for_argmax", "output projection"),
                           ("choose", "pick token")):
            patched[name] = getattr(peftlab.generation, name)
            setattr(peftlab.generation, name, timed_function(patched[name], timer, part))
    try:
        yield
    finally:
        for name, function in patched.items():
            setattr(peftlab.generation, name, function)
        for handle in handles:
            handle.remove()


def timed_function(function, timer: PartTimer, part: str):
    """`function`, its seconds added to `part`; a call inside another timed call of the same part (project_for_argmax
    falling back to project) is counted once, by the outer one."""

    def timed(*args, **kwargs):
        if part in timer.running:
            return function(*args, **kwargs)
        timer.running.add(part)
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            timer.add(part, time.perf_counter() - start)
            timer.running.discard(part)

    return timed


def profile_once(model, loop, prompts, new_tokens: int, reference: bool) -> dict[str, float]:
    timer = PartTimer()
    pick = timed_function(lambda logits: logits.argmax(-1), timer, "pick token") if reference else None
    with instrumented(model, timer, reference):
        start = time.perf_counter()
        loop(model, prompts, new_tokens, set(), 0, pick)
        timer.add("total", time.perf_counter() - start)
    return timer.seconds


def step_profile(model, loop, prompts, new_tokens: int, reference: bool) -> dict[str, float]:
    """Milliseconds per decode step by part: (a decode of new_tokens) - (a decode of 1), over new_tokens - 1."""
    loop(model, prompts, 4, set(), 0)  # warm-up
    long, short = (profile_once(model, loop, prompts, count, reference) for count in (new_tokens, 1))
    per_step = {part: 1e3 * (long[part] - short.get(part, 0.0)) / (new_tokens - 1) for part in long}
    per_step["rest of the body (embedding, norms, rotary, mask)"] = (per_step.pop("body") - per_step["attention"]
                                                                      - per_step["mlp"])
    per_step["loop overhead (outside the model)"] = per_step["total"] - sum(
        value for part, value in per_step.items() if part != "total")
    return per_step


def profile(args: argparse.Namespace) -> None:
    model, tokenizer = load_model("smollm2-135m")
    loops = {"before (reference_decode)": (reference_decode, True), "after (generation.decode)": (peftlab.generation.decode, False)}
    results = {}
    for batch_size in BATCHES:
        prompts = [tokenizer(prompt)["input_ids"] for prompt in PROMPTS[:batch_size]]
        for name, (loop, reference) in loops.items():
            results[f"batch {batch_size}, {name}"] = step_profile(model, loop, prompts, args.new_tokens, reference)
    parts = list(next(iter(results.values())))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; smollm2-135m fp32; greedy; ms per decode "
          f"step ({args.new_tokens} new tokens minus 1; prompt forward excluded)\n")
    print("| part | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for part in parts:
        print(f"| {part} | " + " | ".join(f"{row[part]:.2f}" for row in results.values()) + " |")
    out = Path(__file__).parent / "results" / "generate_profile.json"
    write_text_atomic(out, json.dumps(results, indent=2))
    print(f"\nraw numbers: {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--profile", action="store_true", help="where a decode step's time goes, before and after")
    args = parser.parse_args()
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be >= 2")
    (profile if args.profile else compare)(args)


if __name__ == "__main__":
    main()
