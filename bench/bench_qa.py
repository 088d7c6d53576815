"""SQuAD evaluation speed: peftlab's batched greedy generation (own KV-cache loop) vs transformers `generate`
on the same adapter loaded through Hugging Face `peft`, side by side in one process.

    .venv/bin/python bench/bench_qa.py RUN_DIR [--limit 200] [--batch-size 16] [--repeats 2]

RUN_DIR is a `peftlab train --task squad` LoRA run; the peer loads its best checkpoint exported for peft
(un-merged, as peft users run it) and gets exactly the same prompt tokens in the same length-sorted batches,
stopping at EOS or a newline token with the same token budget. Both sides' answers are scored with the same
EM/F1 code and compared answer by answer (printed). Sides alternate per repeat; medians with the min-max
spread; writes bench/results/qa.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from bench_instruct import peer_model

from peftlab.data import evenly_spaced
from peftlab.generation import left_pad
from peftlab.workloads import load_run


def peer_predict(model, task, batches) -> list[str]:
    pad, stops = task.tokenizer.pad_token_id, sorted(task.stop_ids)
    answers = []
    for batch in batches:
        input_ids, attention_mask, _ = left_pad(task.prompts(batch), pad)
        with torch.inference_mode():
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=task.max_new_tokens,
                                    do_sample=False, pad_token_id=pad, eos_token_id=stops)
        for row in output[:, input_ids.shape[1] :].tolist():
            text = task.tokenizer.decode(row, skip_special_tokens=True)
            answers.append(text.split("\n")[0].strip())
    return answers


def ours_predict(model, task, batches) -> list[str]:
    with torch.inference_mode():
        return [answer for batch in batches for answer in task.predict(model, batch)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--limit", type=int, default=200, help="evenly spaced validation questions (0 = all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    _, task, ours = load_run(args.run_dir, "best")
    ours.eval()  # LoRA merged
    peer = peer_model(args.run_dir)
    examples = evenly_spaced(task.encode("validation"), args.limit)
    order = sorted(examples, key=lambda example: example.target.prompt_length)
    batches = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    sides = {"peftlab generate": lambda: ours_predict(ours, task, batches),
             "HF peft + generate": lambda: peer_predict(peer, task, batches)}
    seconds, answers = {name: [] for name in sides}, {}
    for repeat in range(args.repeats):
        for name in list(sides) if repeat % 2 == 0 else list(reversed(sides)):
            started = time.perf_counter()
            answers[name] = sides[name]()
            seconds[name].append(time.perf_counter() - started)
            print(f"[repeat {repeat + 1}/{args.repeats}] {name}: {seconds[name][-1]:.1f} s", flush=True)

    print(f"\n{args.run_dir} [best], validation: {len(order)} questions, batch {args.batch_size}, {args.repeats} repeats, "
          "median (min-max)\n")
    print("| | questions/s | EM | F1 | same answer as HF generate |")
    print("|---|---|---|---|---|")
    results = {}
    for name, times in seconds.items():
        rates = [len(order) / value for value in times]
        metrics = task.metrics(answers[name], order)
        same = sum(int(a == b) for a, b in zip(answers[name], answers["HF peft + generate"])) / len(order)
        results[name] = {"questions_per_second": rates, "exact_match": metrics["exact_match"], "f1": metrics["f1"],
                         "agreement_with_hf": same}
        print(f"| {name} | {statistics.median(rates):.2f} ({min(rates):.2f}-{max(rates):.2f}) | "
              f"{metrics['exact_match']:.2f} | {metrics['f1']:.2f} | {same:.4f} |")
    ratio = statistics.median(results["peftlab generate"]["questions_per_second"]) / statistics.median(
        results["HF peft + generate"]["questions_per_second"])
    print(f"peftlab generate: {ratio:.2f}x HF peft + generate")
    out = Path(__file__).parent / "results" / "qa.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"arguments": vars(args), "results": results}, indent=2))
    print(f"\nraw numbers: {out}")


if __name__ == "__main__":
    main()
