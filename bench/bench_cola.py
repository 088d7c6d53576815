"""CoLA LoRA fine-tuning: peftlab vs the usual stack (transformers `Trainer` + `peft`) on the same model and data.

    .venv/bin/python bench/bench_cola.py [--train-limit 1024] [--epochs 1] [--repeats 2]

Both sides train SmolLM2-135M with the same recipe (LoRA r=8, alpha=16, dropout 0.1 on q_proj/v_proj,
batch 32, lr 5e-4, warm-up 6%, weight decay 0.01, eval batch 64) on `--train-limit` evenly spaced sentences of
CoLA's in_domain_train (0 = all 8,551), then evaluate on the 527 in-domain dev sentences. Each side runs in its
own process (so peak RSS is its own), sides alternate (ours, peer, peer, ours, ...). Reported: seconds per
training epoch (scaled to the full 8,551-sentence epoch when a subset was used, and marked so), evaluation
sentences/s, peak RSS, dev accuracy and MCC. Writes bench/results/cola.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = dict(rank=8, alpha=16, dropout=0.1, batch_size=32, lr=5e-4, warmup_ratio=0.06, weight_decay=0.01, eval_batch=64)
FULL_EPOCH = 8551


def data_dir() -> str:
    return os.environ.get("PEFTLAB_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data")


def run_ours(train_limit: int, epochs: int, seed: int) -> dict:
    from peftlab.config import RunConfig
    from peftlab.train import train

    config = RunConfig(output_dir=tempfile.mkdtemp(prefix="bench-cola-ours-"))
    config.task.data_dir, config.task.train_limit = data_dir(), train_limit
    config.adapter.targets, config.adapter.rank, config.adapter.alpha = ["q", "v"], RECIPE["rank"], RECIPE["alpha"]
    config.adapter.dropout = RECIPE["dropout"]
    train_settings = config.train
    train_settings.epochs, train_settings.batch_size, train_settings.lr = epochs, RECIPE["batch_size"], RECIPE["lr"]
    train_settings.warmup_ratio, train_settings.weight_decay = RECIPE["warmup_ratio"], RECIPE["weight_decay"]
    train_settings.eval_batch_size, train_settings.seed, train_settings.device = RECIPE["eval_batch"], seed, "cpu"
    summary = train(config)
    last = summary["last"]
    return {"train_seconds": summary["seconds_per_epoch"], "eval_sentences_per_s": last["val_examples_per_second"],
            "accuracy": last["val_accuracy"], "mcc": last["val_mcc"], "train_examples": summary["train_examples"]}


def run_peer(train_limit: int, epochs: int, seed: int) -> dict:
    """What a user of transformers + peft writes: Trainer, dynamic padding, peft LoRA on q_proj/v_proj."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from sklearn.metrics import matthews_corrcoef
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)

    from peftlab.data import evenly_spaced
    from peftlab.data.cola import read_cola
    from peftlab.models import smollm2_cache_path

    torch.manual_seed(seed)
    cache = smollm2_cache_path()
    tokenizer = AutoTokenizer.from_pretrained(cache)
    model = AutoModelForSequenceClassification.from_pretrained(cache, num_labels=2, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    lora = LoraConfig(r=RECIPE["rank"], lora_alpha=RECIPE["alpha"], lora_dropout=RECIPE["dropout"],
                      target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    model = get_peft_model(model, lora)

    def dataset(split: str, limit: int = 0):
        examples = read_cola(split, data_dir())
        examples = evenly_spaced(examples, limit)
        encoded = tokenizer([example.text for example in examples], truncation=True, max_length=128)
        return [{"input_ids": ids, "attention_mask": mask, "labels": example.label}
                for ids, mask, example in zip(encoded["input_ids"], encoded["attention_mask"], examples)]

    train_set, dev_set = dataset("train", train_limit), dataset("validation")

    class EpochTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.started = [], 0.0

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_epoch_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.started)

    def metrics(prediction):
        predicted = np.argmax(prediction.predictions, axis=-1)
        return {"accuracy": float((predicted == prediction.label_ids).mean()),
                "mcc": float(matthews_corrcoef(prediction.label_ids, predicted))}

    arguments = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-cola-peer-"), per_device_train_batch_size=RECIPE["batch_size"],
        per_device_eval_batch_size=RECIPE["eval_batch"], learning_rate=RECIPE["lr"], num_train_epochs=epochs,
        warmup_steps=RECIPE["warmup_ratio"], weight_decay=RECIPE["weight_decay"], eval_strategy="no",
        save_strategy="no", report_to=[], use_cpu=True, seed=seed, logging_strategy="no", disable_tqdm=True,
    )
    timer = EpochTimer()
    trainer = Trainer(model=model, args=arguments, train_dataset=train_set, eval_dataset=dev_set,
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=metrics, callbacks=[timer])
    trainer.train()
    started = time.perf_counter()
    evaluation = trainer.evaluate()
    eval_seconds = time.perf_counter() - started
    return {"train_seconds": timer.seconds, "eval_sentences_per_s": len(dev_set) / eval_seconds,
            "accuracy": evaluation["eval_accuracy"], "mcc": evaluation["eval_mcc"], "train_examples": len(train_set)}


def child(side: str, train_limit: int, epochs: int, seed: int, out: str) -> None:
    result = (run_ours if side == "ours" else run_peer)(train_limit, epochs, seed)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out).write_text(json.dumps(result))


def spread(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-limit", type=int, default=1024, help="training sentences (0 = all 8,551)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--side", choices=("ours", "peer"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        child(args.side, args.train_limit, args.epochs, args.seed, args.out)
        return

    results: dict[str, list[dict]] = {"ours": [], "peer": []}
    for repeat in range(args.repeats):
        for side in (("ours", "peer") if repeat % 2 == 0 else ("peer", "ours")):
            out = tempfile.mktemp(suffix=".json")
            command = [sys.executable, __file__, "--side", side, "--train-limit", str(args.train_limit),
                       "--epochs", str(args.epochs), "--seed", str(args.seed), "--out", out]
            print(f"[repeat {repeat + 1}/{args.repeats}] {side} ...", flush=True)
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            results[side].append(json.loads(Path(out).read_text()))

    examples = results["ours"][0]["train_examples"]
    scale = FULL_EPOCH / examples
    scaled = " (measured on %d sentences, scaled x%.2f to 8,551)" % (examples, scale) if examples != FULL_EPOCH else ""
    rows = {}
    for side, runs in results.items():
        epoch_seconds = [seconds * scale for run in runs for seconds in run["train_seconds"]]
        rows[side] = {
            "epoch_seconds": epoch_seconds,
            "eval": [run["eval_sentences_per_s"] for run in runs],
            "rss": [run["peak_rss_mib"] for run in runs],
            "mcc": [run["mcc"] for run in runs],
            "accuracy": [run["accuracy"] for run in runs],
        }
    print(f"\nCoLA, smollm2-135m, LoRA r=8 a=16 q,v, batch 32, {args.epochs} epoch(s) on {examples} sentences, "
          f"{args.repeats} repeats per side, interleaved; median (min-max)\n")
    print("| | peftlab | Trainer + peft | peftlab / peer |")
    print("|---|---|---|---|")
    ours, peer = rows["ours"], rows["peer"]
    print(f"| seconds per training epoch{scaled} | {spread(ours['epoch_seconds'])} | {spread(peer['epoch_seconds'])} | "
          f"{statistics.median(peer['epoch_seconds']) / statistics.median(ours['epoch_seconds']):.2f}x faster |")
    print(f"| evaluation sentences/s (527 dev) | {spread(ours['eval'])} | {spread(peer['eval'])} | "
          f"{statistics.median(ours['eval']) / statistics.median(peer['eval']):.2f}x faster |")
    print(f"| peak RSS MiB | {spread(ours['rss'], 0)} | {spread(peer['rss'], 0)} | "
          f"{statistics.median(ours['rss']) / statistics.median(peer['rss']):.2f}x |")
    print(f"| dev accuracy | {spread(ours['accuracy'], 4)} | {spread(peer['accuracy'], 4)} | |")
    print(f"| dev MCC | {spread(ours['mcc'], 4)} | {spread(peer['mcc'], 4)} | |")
    out = Path(__file__).parent / "results" / "cola.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"arguments": vars(args), "results": results}, indent=2))
    print(f"\nraw numbers: {out}")


if __name__ == "__main__":
    main()
