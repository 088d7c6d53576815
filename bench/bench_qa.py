"""SQuAD speed with shared contexts: training seconds per epoch and evaluation questions/s, shared vs unshared
(`--no-share-prefix`, how every question was computed before), and transformers `generate` on the same adapter
loaded through Hugging Face `peft`; side by side in one process, sides alternating per repeat.

    .venv/bin/python bench/bench_qa.py [--train-questions 128] [--eval-questions 96] [--repeats 2]

Data: whole paragraphs, evenly spaced over the real files (the questions of a paragraph stay together, as in the
full split), written to a temporary data directory. Training: `peftlab train` with the README's SQuAD recipe
(all-linear r16, alpha 32, lr 6e-4, cosine, batch 16, 1 epoch) on SmolLM2-135M, once shared and once unshared per
repeat; the time is the epoch's `train_seconds` (evaluation excluded). Evaluation, on the LoRA the first shared
run trained: `peftlab eval`'s `evaluate` (teacher-forced loss + greedy answers) shared and unshared, and HF peft +
`generate` (answers only, the same prompt tokens, length-sorted batches, the same stop tokens and token budget).
Answers are compared question by question. Medians with the min-max spread; writes bench/results/qa.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_instruct import peer_model

from peftlab.config import RunConfig
from peftlab.data import resolve_data_dir
from peftlab.engine import evaluate
from peftlab.generation import left_pad
from peftlab.train import train
from peftlab.workloads.loading import load_run


def paragraph_subset(source: Path, questions: int) -> dict:
    """Evenly spaced whole paragraphs of a SQuAD file, about `questions` questions in all."""
    document = json.loads(source.read_text())
    paragraphs = [(article["title"], paragraph) for article in document["data"] for paragraph in article["paragraphs"]]
    per_paragraph = sum(len(paragraph["qas"]) for _, paragraph in paragraphs) / len(paragraphs)
    count = max(1, round(questions / per_paragraph))
    chosen = [paragraphs[index * len(paragraphs) // count] for index in range(count)]
    return {"data": [{"title": title, "paragraphs": [paragraph]} for title, paragraph in chosen], "version": "1.1"}


def write_data(directory: Path, train_questions: int, validation_questions: int) -> str:
    squad = resolve_data_dir(None, "squad")
    (directory / "squad").mkdir(parents=True)
    for split, count in (("train", train_questions), ("validation", validation_questions)):
        subset = paragraph_subset(squad / f"dev-split-{split}.json", count)
        (directory / "squad" / f"dev-split-{split}.json").write_text(json.dumps(subset))
    return str(directory)


def recipe(data_dir: str, output_dir: Path, share: bool) -> RunConfig:
    config = RunConfig()
    config.task.name, config.task.data_dir, config.task.share_prefix = "squad", data_dir, share
    config.task.eval_limit = 1  # the training runs' own evaluation is not what is measured
    config.adapter.targets, config.adapter.rank, config.adapter.alpha, config.adapter.dropout = ["all-linear"], 16, 32.0, 0.0
    config.train.epochs, config.train.lr, config.train.schedule, config.train.batch_size = 1, 6e-4, "cosine", 16
    config.output_dir = str(output_dir)
    return config


def peer_answers(model, task, examples, batch_size: int) -> list[str]:
    pad, stops = task.tokenizer.pad_token_id, sorted(task.stop_ids)
    order = sorted(range(len(examples)), key=lambda index: examples[index].target.prompt_length)
    answers = {}
    for offset in range(0, len(order), batch_size):
        indices = order[offset : offset + batch_size]
        input_ids, attention_mask, _ = left_pad(task.prompts([examples[i] for i in indices]), pad)
        with torch.inference_mode():
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=task.max_new_tokens,
                                    do_sample=False, pad_token_id=pad, eos_token_id=stops)
        for index, row in zip(indices, output[:, input_ids.shape[1] :].tolist()):
            answers[index] = task.tokenizer.decode(row, skip_special_tokens=True).split("\n")[0].strip()
    return [answers[index] for index in range(len(examples))]


def ours_answers(model, task, examples, batch_size: int, share: bool, predictions: Path) -> tuple[list[str], dict]:
    """`peftlab eval`'s evaluation, its answers read back from the predictions file it writes."""
    task.shares_prefixes = share
    metrics = evaluate(model, task, examples, batch_size, predictions_file=predictions)
    return [json.loads(line)["prediction"] for line in predictions.read_text().splitlines()], metrics


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-questions", type=int, default=128)
    parser.add_argument("--eval-questions", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16, help="evaluation batch size (questions)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-qa-"))
    data = write_data(work / "data", args.train_questions, 1)
    eval_data = write_data(work / "eval-data", 1, args.eval_questions)

    train_seconds, steps, first_shared_run = {"shared": [], "unshared": []}, {}, None
    for repeat in range(args.repeats):
        for side in ("shared", "unshared") if repeat % 2 == 0 else ("unshared", "shared"):
            run = work / f"{side}-{repeat}"
            train(recipe(data, run, side == "shared"))
            (row,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            train_seconds[side].append(row["train_seconds"])
            steps[side] = row["step"]
            first_shared_run = first_shared_run or (run if side == "shared" else None)
            print(f"[train {repeat + 1}/{args.repeats}] {side}: {row['train_seconds']:.1f} s, {row['step']} steps, "
                  f"train loss {row['train_loss']:.4f}", flush=True)

    _, task, model = load_run(str(first_shared_run))
    model.eval()  # LoRA merged, as `peftlab eval` runs it
    task.data_dir = eval_data
    examples = task.encode("validation")
    peer = peer_model(str(first_shared_run))
    predictions = work / "predictions.jsonl"
    sides = {"peftlab eval, shared contexts": lambda: ours_answers(model, task, examples, args.batch_size, True, predictions),
             "peftlab eval, unshared": lambda: ours_answers(model, task, examples, args.batch_size, False, predictions),
             "HF peft + generate": lambda: (peer_answers(peer, task, examples, args.batch_size), None)}
    eval_seconds, answers, losses = {name: [] for name in sides}, {}, {}
    for repeat in range(args.repeats):
        for name in list(sides) if repeat % 2 == 0 else list(reversed(sides)):
            started = time.perf_counter()
            answers[name], metrics = sides[name]()
            eval_seconds[name].append(time.perf_counter() - started)
            if metrics:
                losses[name] = metrics["loss"]
            print(f"[eval {repeat + 1}/{args.repeats}] {name}: {eval_seconds[name][-1]:.1f} s", flush=True)

    questions = json.loads((first_shared_run / "summary.json").read_text())["train_examples"]
    print(f"\nTraining: {questions} questions ({args.train_questions} asked for, whole paragraphs), 1 epoch, "
          f"{args.repeats} repeats, median (min-max)\n")
    print("| | train s/epoch | steps | questions/s |\n|---|---|---|---|")
    for side, values in train_seconds.items():
        print(f"| {side} | {spread(values)} | {steps[side]} | {spread([questions / v for v in values])} |")
    train_ratios = [u / s for u, s in zip(train_seconds["unshared"], train_seconds["shared"])]
    print(f"shared: {spread(train_ratios)}x faster per epoch (ratio per repeat)")

    reference = answers["HF peft + generate"]
    print(f"\nEvaluation: {len(examples)} validation questions, batch {args.batch_size}\n")
    print("| | questions/s | EM | F1 | same answer as HF generate | same as unshared |\n|---|---|---|---|---|---|")
    results = {"train_seconds": train_seconds, "train_steps": steps, "train_questions": questions, "eval": {}}
    for name, times in eval_seconds.items():
        rates = [len(examples) / value for value in times]
        metrics = task.metrics(answers[name], examples)
        same_hf = sum(a == b for a, b in zip(answers[name], reference)) / len(examples)
        same_unshared = sum(a == b for a, b in zip(answers[name], answers["peftlab eval, unshared"])) / len(examples)
        results["eval"][name] = {"questions_per_second": rates, "exact_match": metrics["exact_match"], "f1": metrics["f1"],
                                 "agreement_with_hf": same_hf, "agreement_with_unshared": same_unshared,
                                 "loss": losses.get(name)}
        print(f"| {name} | {spread(rates)} | {metrics['exact_match']:.2f} | {metrics['f1']:.2f} | {same_hf:.4f} | "
              f"{same_unshared:.4f} |")
    shared, hf = (statistics.median(results["eval"][n]["questions_per_second"]) for n in
                  ("peftlab eval, shared contexts", "HF peft + generate"))
    unshared = statistics.median(results["eval"]["peftlab eval, unshared"]["questions_per_second"])
    print(f"shared: {shared / hf:.2f}x HF peft + generate, {shared / unshared:.2f}x unshared; validation loss "
          f"shared {losses['peftlab eval, shared contexts']:.6f}, unshared {losses['peftlab eval, unshared']:.6f}")
    out = Path(__file__).parent / "results" / "qa.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"arguments": vars(args), "results": results}, indent=2))
    print(f"\nraw numbers: {out}")


if __name__ == "__main__":
    main()
