"""Benchmark: peftlab's DPO (`peftlab train --objective dpo`) against TRL's `DPOTrainer` (TRL 1.16.0, peft LoRA):
the same pairs, model, LoRA, initial adapter, β, batches and optimizer; per-step parity and seconds per step.

    # the full measurement (a quiet machine; both sides get the same threads)
    PEFTLAB_DATA=/work/shared/data .venv-peers/bin/python bench/bench_dpo.py --model smollm2-135m --pairs 64 \\
        --batch-size 8 --steps 8 --repeats 5
    # smoke runs
    PEFTLAB_DATA=/work/shared/data OMP_NUM_THREADS=1 .venv-peers/bin/python bench/bench_dpo.py --model tiny
    PEFTLAB_DATA=/work/shared/data OMP_NUM_THREADS=1 .venv-peers/bin/python bench/bench_dpo.py --pairs 4 \\
        --batch-size 4 --steps 2 --repeats 1

Run it with the interpreter of the venv that holds TRL and peft (.venv-peers); ours runs as the `peftlab` command
of that same venv (the same torch), so both sides differ only in the trainer.

Pairs (a deterministic construction from Rotten Tomatoes training reviews, peftlab's split): pair i takes the i-th
positive and the i-th negative review of at least PROMPT_WORDS + 2 words; prompt = the positive review's first
PROMPT_WORDS words, chosen = " " + its next words (at most COMPLETION_WORDS), rejected = " " + the negative
review's words after its own first PROMPT_WORDS (at most COMPLETION_WORDS). `--pairs` train pairs, and one more as
validation.jsonl (peftlab evaluates at every epoch's end; TRL gets no evaluation set).

Both sides: LoRA rank 8, alpha 16, dropout 0 on every attention and MLP projection; the SAME initial adapter (peftlab
builds its model as `peftlab train` does, from the same config and seed, and its lora_A / lora_B (zeros) are copied
into peft's); β 0.1; sigmoid loss; reference = the same model with its adapter disabled; AdamW (lr 5e-4, betas
0.9/0.999, eps 1e-8, weight decay 0), gradient clipping at norm 1, constant learning rate without warm-up; fp32; no
dropout; max length 128 (nothing is cut on either side). The batches are the same: peftlab's engine plans its
length-grouped, seeded batches (`engine.epoch_batches`) and TRL gets the pairs in exactly that order with its
sequential sampler. TRL settings that differ from its defaults so the two compute the same thing: bf16=False (its
default is bf16 autocast), gradient_checkpointing=False (its default recomputes activations in the backward),
optim="adamw_torch" (its default, adamw_torch_fused, rounds differently), logging_steps=1.

Parity: per step, peftlab's steps.jsonl against TRL's log history: loss, rewards/chosen, rewards/rejected,
rewards/margins, rewards/accuracies (target: max abs difference <= 1e-4), and logps/chosen, logps/rejected and the
gradient norm beside them. The log-probs are not held to 1e-4: each is a sum over ~25 tokens whose fp32 rounding
depends on the shapes of the model call (on SmolLM2, one unpadded sequence with the LM head on 28 instead of 27
columns moves its 27-token sum by 3.5e-3; peftlab runs the head on the target positions only); policy and reference
share each side's rounding, so it cancels in the rewards. The pairs' tokens are compared too (TRL tokenises the
prompt + completion + EOS text together and cuts at the common prefix; peftlab tokenises them separately).

Speed: seconds per optimizer step, each side's own step clock from fetching the batch to the end of the
optimizer step (peftlab: steps.jsonl "seconds", which include collating the batch; TRL: from its
`get_batch_samples` to `on_step_end`), the first step excluded as warm-up; one sample per repeat (the mean of the
run's steps 2..S), sides alternating (ours, TRL, TRL, ours, ...); median with min-max. Peak memory: each run is its
own process; its RSS high-water mark from `os.wait4` (ru_maxrss). Writes bench/results/dpo.json (dpo-tiny.json for
--model tiny) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# peftlab, torch, TRL are imported inside functions: the TRL child process (this file with --trl-child) then loads no
# peftlab module, so its peak memory is TRL's own.
PROMPT_WORDS, COMPLETION_WORDS = 4, 20
RANK, ALPHA, BETA, LR, MAX_GRAD_NORM, MAX_LENGTH, SEED = 8, 16, 0.1, 5e-4, 1.0, 128, 0
TOLERANCE = 1e-4
TARGET_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
ALSO_COMPARED = ("logps/chosen", "logps/rejected", "grad_norm")
RESULTS = Path(__file__).parent / "results"


# ----------------------------------------------------------------------------------------------------------
# Inputs both sides share: the pairs, the model, the initial adapter, the batch order


def write_pairs(folder: Path, count: int) -> None:
    """folder/train.jsonl (`count` pairs) and folder/validation.jsonl (one more), built as the docstring says."""
    from peftlab.data.rotten_tomatoes import read_rotten_tomatoes

    reviews = read_rotten_tomatoes("train")
    long_enough = [review for review in reviews if len(review.text.split()) >= PROMPT_WORDS + 2]
    positive = [review.text.split() for review in long_enough if review.label == 1]
    negative = [review.text.split() for review in long_enough if review.label == 0]
    if min(len(positive), len(negative)) < count + 1:
        raise SystemExit(f"--pairs {count}: Rotten Tomatoes train has only {min(len(positive), len(negative))} "
                         "reviews of each class long enough")
    pairs = [{"prompt": " ".join(good[:PROMPT_WORDS]),
              "chosen": " " + " ".join(good[PROMPT_WORDS:PROMPT_WORDS + COMPLETION_WORDS]),
              "rejected": " " + " ".join(bad[PROMPT_WORDS:PROMPT_WORDS + COMPLETION_WORDS])}
             for good, bad in zip(positive[: count + 1], negative[: count + 1])]
    folder.mkdir(parents=True)
    for name, lines in (("train.jsonl", pairs[:count]), ("validation.jsonl", pairs[count:])):
        (folder / name).write_text("".join(json.dumps(pair) + "\n" for pair in lines))


def tiny_model_dir(folder: Path) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer, as a local Hugging Face directory (the smoke mode)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftlab.catalog import smollm2_cache_path

    source = smollm2_cache_path()
    config = AutoConfig.from_pretrained(source)
    config.update({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "head_dim": 16})
    torch.manual_seed(SEED)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, folder / name)
    return folder


def our_argv(model: str, pairs: Path, output_dir: Path, batch_size: int, steps: int, epochs: int) -> list[str]:
    """`peftlab train` arguments of our side."""
    return ["train", "--objective", "dpo", "--preferences", str(pairs), "--model", model, "--method", "lora",
            "--targets", "all-linear", "--rank", str(RANK), "--alpha", str(ALPHA), "--lora-dropout", "0",
            "--beta", str(BETA), "--lr", str(LR), "--batch-size", str(batch_size),
            "--grad-accum", "1", "--warmup-ratio", "0", "--schedule", "constant", "--weight-decay", "0",
            "--max-grad-norm", str(MAX_GRAD_NORM), "--seed", str(SEED), "--epochs", str(epochs), "--max-steps",
            str(steps), "--max-length", str(MAX_LENGTH), "--device", "cpu", "--precision", "fp32",
            "--output-dir", str(output_dir)]


def our_setup(argv: list[str], adapter_file: Path) -> tuple[list[list[int]], list[str], list[list]]:
    """From our run's config, built as `peftlab train` builds it: its initial LoRA tensors saved to `adapter_file`
    ({module}.lora_A / .lora_B, peft's layout); returns (each step's batch as train-pair indices, the adapted
    module names, each train pair's tokens: [prompt + chosen + EOS, prompt + rejected + EOS, prompt length])."""
    import torch
    from safetensors.torch import save_file

    from peftlab.cli import _build_parser
    from peftlab.commands.run import train_config_from_args
    from peftlab.engine import epoch_batches
    from peftlab.peft.base import adapter_modules
    from peftlab.workloads.loading import build_model, build_task

    config = train_config_from_args(_build_parser().parse_args(argv))
    task = build_task(config)
    model = build_model(config, task, torch.device("cpu"), fresh=True)
    modules = dict(adapter_modules(model))
    tensors = {}
    for name, module in modules.items():
        if not torch.equal(module.lora_b, torch.zeros_like(module.lora_b)):
            raise SystemExit(f"{name}: our lora_B is not zero at initialisation")
        tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = module.lora_a.detach(), module.lora_b.detach()
    save_file({key: value.contiguous() for key, value in tensors.items()}, adapter_file)
    examples = task.encode("train")
    settings = config.train
    batches = [[index for unit in batch for index in unit]
               for epoch in range(settings.epochs)
               for batch in epoch_batches(examples, settings.batch_size, settings.seed, epoch, task.shares_prefixes)]
    tokens = [[example.target.chosen.input_ids, example.target.rejected.input_ids,
               example.target.chosen.target.prompt_length] for example in examples]
    return batches[: settings.max_steps], sorted(modules), tokens


# ----------------------------------------------------------------------------------------------------------
# The TRL side (a child process: `bench_dpo.py --trl-child SPEC.json`)


def run_trl(spec: dict) -> None:
    """TRL's DPOTrainer on the spec's pairs, in the spec's order; writes its log history and step seconds."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class TimedDPOTrainer(DPOTrainer):
        """Marks when a step starts fetching its batch (the step clock's start)."""

        step_started = 0.0

        def get_batch_samples(self, *args, **kwargs):
            self.step_started = time.perf_counter()
            return super().get_batch_samples(*args, **kwargs)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.seconds, self.trainer = [], None

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.trainer.step_started)

    pairs = [json.loads(line) for line in Path(spec["pairs"]).read_text().splitlines()]
    ordered = Dataset.from_list([pairs[index] for batch in spec["batches"] for index in batch])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    initial = load_file(spec["adapter"])
    modules = sorted({key.rsplit(".", 1)[0] for key in initial})
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=sorted({name.rsplit(".", 1)[-1] for name in modules}))
    args = DPOConfig(output_dir=spec["output_dir"], per_device_train_batch_size=spec["batch_size"],
                     gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                     weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch",
                     max_grad_norm=MAX_GRAD_NORM, max_steps=len(spec["batches"]), logging_steps=1,
                     save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True, seed=SEED, bf16=False,
                     fp16=False, gradient_checkpointing=False, train_sampling_strategy="sequential", beta=BETA,
                     loss_type=["sigmoid"], max_length=MAX_LENGTH, disable_dropout=True,
                     precompute_ref_log_probs=False, dataloader_num_workers=0, disable_tqdm=True)
    clock = StepClock()
    trainer = TimedDPOTrainer(model=model, args=args, train_dataset=ordered, processing_class=tokenizer,
                              peft_config=lora, callbacks=[clock])
    clock.trainer = trainer
    copy_initial_adapter(trainer.model, initial, modules)
    longest = max(len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))
                  for row in trainer.train_dataset)
    if longest > MAX_LENGTH:
        raise SystemExit(f"TRL would cut a pair of {longest} tokens to max_length {MAX_LENGTH}")
    trainer.train()
    logged = [row for row in trainer.state.log_history if "loss" in row and "rewards/chosen" in row]
    tokens = [[row["prompt_ids"] + row["chosen_ids"], row["prompt_ids"] + row["rejected_ids"], len(row["prompt_ids"])]
              for row in trainer.train_dataset]
    Path(spec["result"]).write_text(json.dumps({"steps": logged, "seconds": clock.seconds, "tokens": tokens,
                                                "threads": torch.get_num_threads()}))


def copy_initial_adapter(peft_model, initial: dict, modules: list[str]) -> None:
    """peft's LoRA tensors := ours (every adapted module must be one of ours, and the reverse)."""
    import torch

    theirs = sorted(name.removeprefix("base_model.model.") for name, module in peft_model.named_modules()
                    if hasattr(module, "lora_A") and "default" in module.lora_A)
    if theirs != modules:
        raise SystemExit(f"peft adapts other modules than ours: {sorted(set(theirs) ^ set(modules))[:4]}")
    with torch.no_grad():
        for name in modules:
            module = peft_model.get_submodule(f"base_model.model.{name}")
            module.lora_A["default"].weight.copy_(initial[f"{name}.lora_A"])
            module.lora_B["default"].weight.copy_(initial[f"{name}.lora_B"])


# ----------------------------------------------------------------------------------------------------------
# Running the sides and comparing them


def run_measured(command: list[str], log: Path) -> tuple[int, float, int]:
    """(exit code, wall seconds, peak RSS in bytes) of a child process; its output goes to `log`."""
    started = time.perf_counter()
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, time.perf_counter() - started, usage.ru_maxrss * 1024  # Linux: KiB


def checked(side: str, code: int, log: Path) -> None:
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"{side} failed (exit {code}); the end of {log}:\n{tail}")


def run_ours(argv: list[str], log: Path) -> dict:
    run_dir = Path(argv[argv.index("--output-dir") + 1])
    shutil.rmtree(run_dir, ignore_errors=True)
    code, wall, rss = run_measured([str(Path(sys.executable).parent / "peftlab"), *argv], log)
    checked("peftlab train", code, log)
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    return {"steps": steps, "step_seconds": [row["seconds"] for row in steps], "wall_seconds": wall, "peak_rss": rss}


def run_theirs(spec: dict, folder: Path, log: Path) -> dict:
    spec_file = folder / "trl-spec.json"
    spec_file.write_text(json.dumps(spec))
    code, wall, rss = run_measured([sys.executable, str(Path(__file__).resolve()), "--trl-child", str(spec_file)], log)
    checked("TRL DPOTrainer", code, log)
    result = json.loads(Path(spec["result"]).read_text())
    return {"steps": result["steps"], "step_seconds": result["seconds"], "wall_seconds": wall, "peak_rss": rss,
            "threads": result["threads"], "tokens": result["tokens"]}


def token_mismatches(ours: list[list], theirs: list[list], batches: list[list[int]]) -> list[int]:
    """The train pairs whose tokens (prompt + chosen + EOS, prompt + rejected + EOS, prompt length) differ between
    our encoding and TRL's; TRL's rows are in batch order."""
    order = [index for batch in batches for index in batch]
    return sorted({index for index, row in zip(order, theirs) if ours[index] != row})


def differences(ours: list[dict], theirs: list[dict]) -> dict[str, list[float]]:
    """Per metric, |ours - TRL| at each step."""
    if len(ours) != len(theirs):
        raise SystemExit(f"peftlab logged {len(ours)} steps, TRL {len(theirs)}")
    return {name: [abs(mine[name] - other[name]) for mine, other in zip(ours, theirs)]
            for name in TARGET_METRICS + ALSO_COMPARED}


def timed_mean(step_seconds: list[float]) -> float:
    """A run's seconds per step: the mean over its steps after the first (warm-up)."""
    return statistics.fmean(step_seconds[1:])


def spread(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", choices=("smollm2-135m", "tiny"),
                        help="tiny: a 2-layer random Llama with SmolLM2's tokenizer")
    parser.add_argument("--pairs", type=int, default=16, help="training pairs (a multiple of --batch-size)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (parity on all, timing on 2..S)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trl-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_child:
        return run_trl(json.loads(Path(args.trl_child).read_text()))
    if args.pairs % args.batch_size or args.steps < 2 or args.repeats < 1:
        raise SystemExit("--pairs must be a multiple of --batch-size (every batch full on both sides), --steps >= 2 "
                         "(the first is warm-up), --repeats >= 1")

    from peftlab.catalog import smollm2_cache_path

    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as temporary:
        folder = Path(temporary)
        write_pairs(folder / "pairs", args.pairs)
        model_dir = tiny_model_dir(folder / "tiny") if args.model == "tiny" else smollm2_cache_path()
        model = str(model_dir) if args.model == "tiny" else args.model
        epochs = math.ceil(args.steps * args.batch_size / args.pairs)
        argv = our_argv(model, folder / "pairs", folder / "ours", args.batch_size, args.steps, epochs)
        batches, modules, tokens = our_setup(argv, folder / "initial-adapter.safetensors")
        spec = {"pairs": str(folder / "pairs" / "train.jsonl"), "batches": batches, "model_dir": str(model_dir),
                "adapter": str(folder / "initial-adapter.safetensors"), "batch_size": args.batch_size,
                "output_dir": str(folder / "trl"), "result": str(folder / "trl-result.json")}
        print(f"DPO: {args.pairs} pairs, batch {args.batch_size}, {args.steps} steps ({epochs} epochs of ours), "
              f"{args.repeats} repeats, model {args.model}, LoRA r{RANK} a{ALPHA} on {len(modules)} modules, "
              f"β {BETA}, lr {LR}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
        runs = {"ours": [], "trl": []}
        for repeat in range(args.repeats):
            for side in ("ours", "trl") if repeat % 2 == 0 else ("trl", "ours"):
                log = folder / f"{side}-{repeat}.log"
                result = run_ours(argv, log) if side == "ours" else run_theirs(spec, folder, log)
                runs[side].append(result)
                print(f"  repeat {repeat + 1} {side}: {timed_mean(result['step_seconds']):.3f} s/step, "
                      f"peak RSS {result['peak_rss'] / 2**20:.0f} MiB, process {result['wall_seconds']:.1f} s")
        mismatched = token_mismatches(tokens, runs["trl"][0]["tokens"], batches)
        report(args, argv, modules, runs, mismatched)


def report(args, argv: list[str], modules: list[str], runs: dict, mismatched: list[int]) -> None:
    """The parity and speed table, and the results JSON."""
    print(f"\nTokens: {len(mismatched)} of the pairs trained differ between peftlab's encoding and TRL's"
          + (f" (pair indices {mismatched[:8]})" if mismatched else " (prompt, completions, EOS all equal)"))
    worst = {}
    for ours, theirs in zip(runs["ours"], runs["trl"]):
        for name, values in differences(ours["steps"], theirs["steps"]).items():
            worst[name] = max(worst.get(name, 0.0), max(values))
    agree = all(worst[name] <= TOLERANCE for name in TARGET_METRICS)
    seconds = {side: spread([timed_mean(run["step_seconds"]) for run in runs[side]]) for side in runs}
    memory = {side: spread([run["peak_rss"] / 2**20 for run in runs[side]]) for side in runs}
    speedup = seconds["trl"]["median"] / seconds["ours"]["median"]

    print(f"\nParity over {args.steps} steps x {args.repeats} repeats: max |peftlab - TRL| (target <= {TOLERANCE:g} "
          "on the first five)")
    print("| metric | max abs difference | step 1 ours | step 1 TRL | last step ours | last step TRL |\n"
          "|---|---:|---:|---:|---:|---:|")
    first_ours, first_theirs = runs["ours"][0]["steps"], runs["trl"][0]["steps"]
    for name in TARGET_METRICS + ALSO_COMPARED:
        print(f"| {name} | {worst[name]:.2e} | {first_ours[0][name]:.6f} | {first_theirs[0][name]:.6f} | "
              f"{first_ours[-1][name]:.6f} | {first_theirs[-1][name]:.6f} |")
    print(f"parity: {'agrees' if agree else 'DOES NOT AGREE'} to {TOLERANCE:g}\n")
    print("| side | s/step median | min–max | peak RSS MiB median | min–max |\n|---|---:|---:|---:|---:|")
    for side, label in (("ours", "peftlab train --objective dpo"), ("trl", "TRL DPOTrainer + peft")):
        time_, rss = seconds[side], memory[side]
        print(f"| {label} | {time_['median']:.3f} | {time_['min']:.3f}–{time_['max']:.3f} | {rss['median']:.0f} | "
              f"{rss['min']:.0f}–{rss['max']:.0f} |")
    print(f"speed-up (TRL median / ours median): {speedup:.2f}x (target >= 1.5x)")

    from peftlab.fileio import write_text_atomic

    results = {"command": " ".join(sys.argv), "model": args.model, "pairs": args.pairs, "batch_size": args.batch_size,
               "steps": args.steps, "repeats": args.repeats, "beta": BETA, "lr": LR, "rank": RANK, "alpha": ALPHA,
               "lora_modules": len(modules), "threads": runs["trl"][0]["threads"],
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "our_command": "peftlab " + " ".join(argv),
               "parity": {"tolerance": TOLERANCE, "agrees": agree, "max_abs_difference": worst,
                          "pairs_with_other_tokens": mismatched},
               "seconds_per_step": seconds, "peak_rss_mib": memory, "speedup_median": speedup,
               "runs": {side: [{key: run[key] for key in ("steps", "step_seconds", "wall_seconds", "peak_rss")}
                               for run in runs[side]] for side in runs}}
    out = RESULTS / ("dpo-tiny.json" if args.model == "tiny" else "dpo.json")
    RESULTS.mkdir(exist_ok=True)
    write_text_atomic(out, json.dumps(results, indent=2) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
