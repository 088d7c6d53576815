"""Instruction-tuned classifier evaluation speed: peftlab by generation, by scoring, and both (`--predict both`),
and transformers `generate` on the same adapter loaded through Hugging Face `peft`, side by side in one process.

    .venv/bin/python bench/bench_instruct.py RUN_DIR [--split validation] [--limit 0] [--repeats 2]

RUN_DIR is a `peftlab train --task rotten_tomatoes` LoRA run; its best checkpoint is exported with
`peftlab export` (peft format) and loaded with `PeftModel.from_pretrained` for the peer, which gets exactly the
same prompt tokens, in the same length-sorted batches, and generates greedily as many tokens as peftlab does.
Every side's predictions are parsed by the same function, so the accuracies must agree (printed). Sides are
interleaved per repeat; medians with the min-max spread; writes bench/results/instruct.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from peftlab.generation import left_pad
from peftlab.workloads.instruct.workload import parse_label
from peftlab.train import export_run
from peftlab.workloads.loading import load_run


def peer_model(run_dir: str):
    """The peer: the run's adapter, exported for peft, on the plain transformers model (un-merged, like peft)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftlab.models import smollm2_cache_path

    exported = export_run(run_dir, tempfile.mkdtemp(prefix="bench-instruct-"), "peft")
    base = AutoModelForCausalLM.from_pretrained(smollm2_cache_path(), dtype=torch.float32)
    return PeftModel.from_pretrained(base, exported).eval()


def peer_predict(model, task, batches) -> list[int]:
    longest = max(len(tokens) for tokens in task.answer_tokens)
    eos, pad = task.tokenizer.eos_token_id, task.tokenizer.pad_token_id
    labels = []
    for batch in batches:
        input_ids, attention_mask, _ = left_pad(task.prompts(batch), pad)
        with torch.inference_mode():
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=longest + 1,
                                    do_sample=False, pad_token_id=pad, eos_token_id=eos)
        for row in output[:, input_ids.shape[1] :].tolist():
            text = task.tokenizer.decode(row[: row.index(eos)] if eos in row else row)
            labels.append(parse_label(text, task.verbalizers))
    return labels


def ours_predict(model, task, batches, mode: str) -> list[int]:
    """Labels predicted in `mode`; in "both" the generated ones (what the engine reports first)."""
    task.predict_mode = mode
    key = "generate" if mode == "both" else mode
    with torch.inference_mode():
        return [result[key] for batch in batches for result in task.predict(model, batch)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--limit", type=int, default=0, help="evenly spaced examples (0 = all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from peftlab.data import evenly_spaced

    config, task, ours = load_run(args.run_dir, "best")
    ours.eval()  # LoRA merged: inference costs what the base model costs
    peer = peer_model(args.run_dir)
    examples = evenly_spaced(task.encode(args.split), args.limit)
    order = sorted(examples, key=lambda example: example.target.prompt_length)
    batches = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    truth = [example.target.reference for batch in batches for example in batch]
    sides = {
        "peftlab generate": lambda: ours_predict(ours, task, batches, "generate"),
        "peftlab score": lambda: ours_predict(ours, task, batches, "score"),
        "peftlab both": lambda: ours_predict(ours, task, batches, "both"),
        "HF peft + generate": lambda: peer_predict(peer, task, batches),
    }
    seconds = {name: [] for name in sides}
    predictions = {}
    for repeat in range(args.repeats):
        names = list(sides) if repeat % 2 == 0 else list(reversed(sides))
        for name in names:
            started = time.perf_counter()
            predictions[name] = sides[name]()
            seconds[name].append(time.perf_counter() - started)
            print(f"[repeat {repeat + 1}/{args.repeats}] {name}: {seconds[name][-1]:.1f} s", flush=True)

    print(f"\n{args.run_dir} [best], {args.split}: {len(examples)} examples, batch {args.batch_size}, "
          f"{args.repeats} repeats, median (min-max)\n")
    print("| | examples/s | accuracy | unparsable | same labels as HF generate |")
    print("|---|---|---|---|---|")
    results = {}
    for name, times in seconds.items():
        rates = [len(examples) / value for value in times]
        labels = predictions[name]
        accuracy = sum(int(p == y) for p, y in zip(labels, truth)) / len(truth)
        same = sum(int(a == b) for a, b in zip(labels, predictions["HF peft + generate"])) / len(truth)
        results[name] = {"examples_per_second": rates, "accuracy": accuracy, "agreement_with_hf": same}
        print(f"| {name} | {statistics.median(rates):.1f} ({min(rates):.1f}-{max(rates):.1f}) | {accuracy:.4f} | "
              f"{labels.count(-1)} | {same:.4f} |")
    base = statistics.median(len(examples) / value for value in seconds["HF peft + generate"])
    for name in ("peftlab generate", "peftlab score", "peftlab both"):
        print(f"{name}: {statistics.median(results[name]['examples_per_second']) / base:.2f}x HF peft + generate")
    out = Path(__file__).parent / "results" / "instruct.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"arguments": vars(args), "results": results}, indent=2))
    print(f"\nraw numbers: {out}")


if __name__ == "__main__":
    main()
