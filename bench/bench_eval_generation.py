"""Evaluation by generation, before and after the fast decoding loop: Rotten Tomatoes test by generation (the
instruct workload, predict=generate) and SQuAD validation answers (the qa workload, shared contexts), zero-shot on
SmolLM2-135M, exactly as `peftlab eval --task rotten_tomatoes --split test` and `peftlab eval --task squad` run them.

    PEFTLAB_DATA=/work/shared/data .venv/bin/python bench/bench_eval_generation.py [--limit 200] [--repeats 5]
        [--weights fp16,int8]

"old" is peftlab as of commit e4c4b74: `reference_decode` below (a bench-only copy of the decoding loop before the
in-place cache, our own code) swapped into the workload modules, and Rotten Tomatoes' prompts computed again for
generation after the loss pass (the task's loss-only forward, so evaluation calls `predict`); "new" is
`peftlab.generation.decode` and the instruct task's forward, which generates from the loss pass's cache. Both
sides run the same command in this process, interleaved (old, new, new, old, ...); their outputs must be
identical: every token each loop generated, and the metrics (checked, else the comparison is void). Prints the
whole evaluation's seconds (model load and the loss pass included, as `peftlab eval` runs) and the decoding loop's
own, medians with the min-max spread; writes bench/results/eval_generation.json
(eval_generation-NAME.json with --only NAME).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import peftlab.generation
import peftlab.workloads.instruct.workload
import peftlab.workloads.qa.workload
from peftlab.cli import main as peftlab_main
from peftlab.errors import PeftlabError
from peftlab.fileio import write_text_atomic
from peftlab.generation import TokenPicker, left_pad
from peftlab.shared_prefix import PrefixCache, continuation_inputs
from peftlab.tasks.completion import CompletionTask

WORKLOAD_MODULES = (peftlab.workloads.instruct.workload, peftlab.workloads.qa.workload)
EVALUATIONS = {"rt_test_generate": ["--task", "rotten_tomatoes", "--split", "test"],
               "squad_validation": ["--task", "squad", "--split", "validation"]}


# ----------------------------------------------------------------------------------------------------------
# The old loop (reference only; src/peftlab/generation.py holds the one in use)


@torch.inference_mode()
def reference_decode(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     stop_ids: set[int] | Sequence[set[int]], pad_id: int, pick_next: TokenPicker | None = None,
                     on_token: Callable[[int, int], None] | None = None, stop_strings: Sequence[str] = (),
                     detokenize: Callable[[list[int]], str] | None = None,
                     prefix: PrefixCache | None = None) -> list[list[int]]:
    """generation.decode as of commit e4c4b74 (per-step torch.cat of the cache, Python loop over rows)."""
    if max_new_tokens < 1:
        raise PeftlabError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if stop_strings and detokenize is None:
        raise ValueError("stop_strings need a detokenize function")
    if any(len(prompt) == 0 for prompt in prompts):
        raise PeftlabError("an empty prompt has nothing to continue; give it at least one token")
    device = next(model.parameters()).device
    row_stops = [stop_ids] * len(prompts) if isinstance(stop_ids, (set, frozenset)) else list(stop_ids)
    # B prompts, T the longest, P the prefix's width (0 without one), V the vocabulary; A rows still active.
    input_ids, attention_mask, position_ids = left_pad(prompts, pad_id, device)  # (B, T) each
    cache = None
    if prefix is not None:  # mask (B, P + T), positions (B, T) shifted by each row's prefix length
        attention_mask, position_ids, cache = continuation_inputs(prefix, input_ids, attention_mask, position_ids)
    output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   cache=cache, use_cache=True, logits_to_keep=1)  # logits (B, 1, V); cache of P + T keys
    generated: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))  # the original row of each batch row; A = len(active)
    for step in range(max_new_tokens):
        logits = output.logits[:, -1]  # (A, V): the next token's, the last column (prompts are left-padded)
        next_tokens = pick_next(logits) if pick_next is not None else logits.argmax(-1)  # (A,)
        keep = []  # batch rows that go on
        for batch_row, (row, token) in enumerate(zip(active, next_tokens.tolist())):
            generated[row].append(token)
            if on_token is not None:
                on_token(row, token)
            stopped = token in row_stops[row] or (stop_strings and any(
                stop in detokenize(generated[row]) for stop in stop_strings))
            if not stopped:
                keep.append(batch_row)
        if not keep or step == max_new_tokens - 1:
            break
        cache = output.cache  # per layer, keys and values (A, kv heads, S, head size); S = P + T + step
        if len(keep) < len(active):  # finished rows leave the batch: A shrinks to len(keep)
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            attention_mask, position_ids, next_tokens = attention_mask[index], position_ids[index], next_tokens[index]
            active = [active[batch_row] for batch_row in keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], dim=1)  # (A, S + 1)
        position_ids = position_ids[:, -1:] + 1  # (A, 1): one past each row's last position
        output = model(input_ids=next_tokens[:, None], attention_mask=attention_mask, position_ids=position_ids,
                       cache=cache, use_cache=True, logits_to_keep=1)  # input (A, 1) -> logits (A, 1, V)
    return generated


# ----------------------------------------------------------------------------------------------------------
# The bench


def recorded_loop(loop: Callable, seconds: list[float], outputs: list) -> Callable:
    """`loop` that adds the seconds of each call to `seconds` and its generated tokens to `outputs`."""

    def run(*args, **kwargs):
        start = time.perf_counter()
        result = loop(*args, **kwargs)
        seconds.append(time.perf_counter() - start)
        outputs.append(result)
        return result

    return run


INSTRUCT = peftlab.workloads.instruct.workload.InstructTask
SIDES = {  # side -> (the decoding loop, Rotten Tomatoes' evaluation forward)
    # e4c4b74: the old loop, and the prompts computed again for generation after the loss pass
    "old": (reference_decode, CompletionTask.forward),
    # today: decode (decode_step) continuing every prompt from the loss pass's cache
    "new": (peftlab.generation.decode, INSTRUCT.forward),
}


def run_eval(arguments: list[str], side: str, limit: int, batch_size: int) -> dict:
    """One `peftlab eval` as `side` runs it ("new-int8": new with --weights int8): wall seconds, the decoding
    loop's seconds, every token it generated and the metrics line."""
    side, _, weights = side.partition("-")
    arguments = [*arguments, "--weights", weights] if weights else arguments
    loop, instruct_forward = SIDES[side]
    loop_seconds: list[float] = []
    generated: list = []
    for module in WORKLOAD_MODULES:
        module.decode = recorded_loop(loop, loop_seconds, generated)
    INSTRUCT.forward = instruct_forward
    argv = ["eval", *arguments, "--limit", str(limit), "--batch-size", str(batch_size), "--device", "cpu"]
    try:
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            status = peftlab_main(argv)
        seconds = time.perf_counter() - start
    finally:
        for module in WORKLOAD_MODULES:
            module.decode = peftlab.generation.decode
        INSTRUCT.forward = SIDES["new"][1]
    if status:
        raise SystemExit(f"peftlab {' '.join(argv)} failed ({status}):\n{printed.getvalue()}")
    summary = next((line for line in printed.getvalue().splitlines() if re.search(r"\(\d+ examples", line)), "")
    return {"seconds": seconds, "loop_seconds": sum(loop_seconds), "generated": generated,
            "summary": summary.rsplit(",", 1)[0]}  # without its examples/s, which differ by side


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=200, help="evenly spaced examples per split (0 = all)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--only", choices=sorted(EVALUATIONS), action="append", help="run only these evaluations")
    parser.add_argument("--weights", default="", help="also time new with packed weights (e.g. fp16,int8; their "
                        "outputs may differ: their metrics are printed)")
    args = parser.parse_args()
    sides = ["old", "new", *(f"new-{kind}" for kind in args.weights.split(",") if kind)]
    results = {"limit": args.limit, "repeats": args.repeats, "batch_size": args.batch_size,
               "threads": torch.get_num_threads(), "evaluations": {}}
    for name in args.only or sorted(EVALUATIONS):
        run_eval(EVALUATIONS[name], "new", min(args.limit, 16) or 16, args.batch_size)  # warm-up
        timings = {side: {"seconds": [], "loop_seconds": []} for side in sides}
        outputs = {}
        for repeat in range(args.repeats):
            for side in sides[repeat % len(sides):] + sides[: repeat % len(sides)]:  # each side first in turn
                run = run_eval(EVALUATIONS[name], side, args.limit, args.batch_size)
                timings[side]["seconds"].append(run["seconds"])
                timings[side]["loop_seconds"].append(run["loop_seconds"])
                outputs.setdefault(side, run)
                if (run["generated"], run["summary"]) != (outputs[side]["generated"], outputs[side]["summary"]):
                    raise SystemExit(f"{name}: the {side} loop gave different outputs from one repeat to the next")
        if (outputs["old"]["generated"], outputs["old"]["summary"]) != (outputs["new"]["generated"], outputs["new"]["summary"]):
            raise SystemExit(f"{name}: the old and new loops generated different tokens: the comparison is void")
        timings["speedup"] = [old / new for old, new in zip(timings["old"]["seconds"], timings["new"]["seconds"])]
        timings["loop_speedup"] = [old / new for old, new in zip(timings["old"]["loop_seconds"],
                                                                  timings["new"]["loop_seconds"])]
        timings["examples"] = int(outputs["new"]["summary"].split(" examples")[0].rsplit("(", 1)[1])
        timings["summary"] = outputs["new"]["summary"]
        for side in sides[2:]:
            timings[side] |= {"speedup": [old / packed for old, packed in zip(timings["old"]["seconds"],
                                                                                 timings[side]["seconds"])],
                              "summary": outputs[side]["summary"],
                              "same_generations": sum(a == b for a, b in zip(outputs[side]["generated"],
                                                                              outputs["new"]["generated"])),
                              "decode_calls": len(outputs["new"]["generated"])}
        results["evaluations"][name] = timings

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; smollm2-135m fp32 zero-shot; "
          f"--limit {args.limit}, batch {args.batch_size}; {args.repeats} interleaved repeats; median (min-max); "
          "every generated token and the metrics identical (checked)\n")
    print("| evaluation | examples | old s | new s | speed-up | old loop s | new loop s | loop speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in results["evaluations"].items():
        print(f"| {name} | {row['examples']} | {spread(row['old']['seconds'])} | {spread(row['new']['seconds'])} | "
              f"{spread(row['speedup'])} | {spread(row['old']['loop_seconds'])} | {spread(row['new']['loop_seconds'])} "
              f"| {spread(row['loop_speedup'])} |")
    for name, row in results["evaluations"].items():
        print(f"{name}: {row['summary']}")
        for side in sides[2:]:
            print(f"  {side}: {spread(row[side]['seconds'])} s, {spread(row[side]['speedup'])}x old, decoding loop "
                  f"{spread(row[side]['loop_seconds'])} s; "
                  f"{row[side]['summary']} (decode calls generating what new did: {row[side]['same_generations']} "
                  f"of {row[side]['decode_calls']})")
    chosen = "-" + "-".join(args.only) if args.only else ""  # one evaluation's run does not replace the other's numbers
    out = Path(__file__).parent / "results" / f"eval_generation{chosen}.json"
    write_text_atomic(out, json.dumps(results, indent=2))
    print(f"\nraw numbers: {out}")


if __name__ == "__main__":
    main()
