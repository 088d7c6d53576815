"""Generation speed of peftlab vs plain transformers `generate` on SmolLM2-135M, side by side in one process.

    .venv/bin/python bench/bench_generate.py [--repeats 5] [--new-tokens 64]

Both sides use the same fp32 weights (peftlab's cache) and greedy decoding, so they must produce the same text
(checked); the runs are interleaved (ours, plain, plain, ours, ...) so machine noise hits both alike. Prints
medians with the min-max spread and writes bench/results/generate.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)

    load_seconds = [time_call(lambda: load_model("smollm2-135m"))[0] for _ in range(args.repeats)]
    ours_model, ours_tokenizer = load_model("smollm2-135m")
    plain_model, plain_tokenizer = plain_transformers(smollm2_cache_path())

    results = {"load_seconds": load_seconds, "new_tokens": args.new_tokens, "repeats": args.repeats, "batches": {}}
    for batch_size in (1, 8):
        prompts = PROMPTS[:batch_size]
        run_plain(plain_model, plain_tokenizer, prompts, 8)  # warm-up, both sides
        generate(ours_model, ours_tokenizer, prompts, Sampling(temperature=0, max_new_tokens=8))
        sides = {
            "ours": lambda: [texts[0] for texts in generate(ours_model, ours_tokenizer, prompts,
                                                            Sampling(temperature=0, max_new_tokens=args.new_tokens))],
            "plain": lambda: run_plain(plain_model, plain_tokenizer, prompts, args.new_tokens)[0],
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
        results["batches"][batch_size] = {"ours_tokens_per_s": ours_rates, "plain_tokens_per_s": plain_rates, "ratio": ratios}

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; smollm2-135m fp32; greedy, "
          f"{args.new_tokens} new tokens; {args.repeats} interleaved repeats; median (min-max)\n")
    print(f"model load from cache: {spread(load_seconds)} s\n")
    print("| batch | peftlab tokens/s | transformers generate tokens/s | ratio peftlab/transformers |")
    print("|---|---|---|---|")
    for batch_size, row in results["batches"].items():
        ratio = row["ratio"]
        print(f"| {batch_size} | {spread(row['ours_tokens_per_s'])} | {spread(row['plain_tokens_per_s'])} | "
              f"{statistics.median(ratio):.2f} ({min(ratio):.2f}-{max(ratio):.2f}) |")
    out = Path(__file__).parent / "results" / "generate.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nraw numbers: {out}")


if __name__ == "__main__":
    main()
