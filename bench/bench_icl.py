"""In-context learning speed: k-shot verbaliser scoring with the demonstrations computed once per set (what
`peftlab icl` does) against recomputing the whole prompt for every test example (what lm-evaluation-harness
does), on the same token rows; sides alternate per repeat, predictions compared example by example.

    OMP_NUM_THREADS=... .venv/bin/python bench/bench_icl.py [--shots 8] [--limit 0] [--repeats 3] [--batch-size 32]

Rotten Tomatoes test split (1,066 reviews; --limit N: N evenly spaced ones), lm-eval's sentiment format, one
demonstration set (seed 0) from the training split, SmolLM2-135M in fp32 on the CPU. Both sides score the same
token rows (the whole prompt tokenised at once) with `tasks.completion.score_choices` in batches of --batch-size;
the unshared side passes each row whole, the shared side continues each row after the rows' shared tokens
(`workloads.icl.scoring.SharedRows`, one prefill per repeat). Writes medians with the min-max spread, the speed-up
and whether predictions and log-likelihoods agree (max abs difference) to bench/results/icl.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from peftlab.data import evenly_spaced
from peftlab.fileio import write_text_atomic
from peftlab.models import load_model
from peftlab.tasks.completion import score_choices
from peftlab.workloads.icl.evaluation import (
    PromptBuilder,
    demonstration_order,
    read_examples,
)
from peftlab.workloads.icl.scoring import SharedRows, choice_loglikelihoods
from peftlab.workloads.icl.templates import resolve_format

RESULTS = Path(__file__).parent / "results" / "icl.json"


def unshared(model, rows, choices, pad_id: int, batch_size: int) -> torch.Tensor:
    return torch.cat([score_choices(model, rows[start : start + batch_size], choices, pad_id).cpu()
                      for start in range(0, len(rows), batch_size)])


def shared(model, rows, choices, pad_id: int, batch_size: int) -> torch.Tensor:
    return choice_loglikelihoods(model, SharedRows(model, rows, pad_id), choices, pad_id, batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--limit", type=int, default=0, help="evenly spaced test reviews; 0 = all 1,066")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m")
    prompt_format = resolve_format("rotten_tomatoes", "lm-eval", None, 2, chat=False)
    builder = PromptBuilder(prompt_format, tokenizer, chat=False)
    pool = read_examples("rotten_tomatoes", "train", None, prompt_format)
    test = evenly_spaced(read_examples("rotten_tomatoes", "test", None, prompt_format), args.limit)
    demonstrations = [pool[index] for index in demonstration_order(pool, args.shots, seed=0, balanced=False)]
    rows = builder.rows(demonstrations, [example.fields for example in test])
    choices = [builder.answer_tokens(verbalizer) for verbalizer in prompt_format.verbalizers]
    sides = {"shared demonstrations": shared, "whole prompt per example": unshared}
    seconds = {name: [] for name in sides}
    scores = {}
    for _ in range(args.repeats):
        for name, score in sides.items():
            started = time.perf_counter()
            scores[name] = score(model, rows, choices, tokenizer.pad_token_id, args.batch_size)
            seconds[name].append(time.perf_counter() - started)
    first, second = scores.values()
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    result = {
        "command": "bench/bench_icl.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                     if k != "output"),
        "examples": len(test), "shots": args.shots, "prompt_tokens_mean": statistics.fmean(map(len, rows)),
        "shared_tokens": SharedRows(model, rows, tokenizer.pad_token_id).shared,
        "seconds": {name: {"median": medians[name], "min": min(times), "max": max(times), "all": times}
                    for name, times in seconds.items()},
        "speed_up": medians["whole prompt per example"] / medians["shared demonstrations"],
        "identical_predictions": bool((first.argmax(-1) == second.argmax(-1)).all()),
        "max_abs_loglikelihood_difference": float((first - second).abs().max()),
        "accuracy": float((first.argmax(-1) == torch.tensor([e.label for e in test])).float().mean()),
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
    }
    write_text_atomic(Path(args.output), json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
