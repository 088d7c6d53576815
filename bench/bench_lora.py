"""Benchmark: peftlab's LoRA vs Hugging Face peft's, side by side in one process, and merged-adapter inference.

    .venv/bin/python bench/bench_lora.py [--quick] [--models gpt2,smollm2-135m] [--repeats N] [--device cpu]

For each model both implementations get the same base weights, the same targets (every attention and MLP linear
layer of each block), rank 8, alpha 16, the same random batch (8 x 128 tokens by default) and AdamW. A training
step is forward + backward + optimizer step. Measurements are interleaved (ours, peft, peft, ours, ...) so drift
in machine load hits both; each repeat times several steps after a warm-up step, and the table reports the median
over repeats with the min-max spread. Raw samples go to bench/results/lora.json (lora-quick.json with --quick).

Inference (no_grad forward of the same batch) compares the base model, ours merged (`merge_adapters`), ours
un-merged (peftlab's default evaluation) and peft's un-merged adapter: merged must cost what the base costs.

Notes: peft wraps the unconverted Hugging Face GPT-2 (Conv1D, weight (in, out)) while ours wraps the converted
nn.Linear, so GPT-2 rows also include that base-layer difference; SmolLM2 (Llama) has nn.Linear on both sides.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from peftlab.models import load_model, smollm2_cache_path
from peftlab.hf import convert_linear_to_conv1d
from peftlab.peft import apply_method, merge_adapters, merge_and_strip

RANK, ALPHA = 8, 16
PEFT_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # c_proj matches attn.c_proj and mlp.c_proj
    "smollm2-135m": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_pair(name: str, device: torch.device):
    """(base, ours, peft_model): the same weights three ways; ours and peft's adapt the same layers."""
    import peft
    from transformers import AutoModelForCausalLM

    if name == "gpt2":
        base, _ = load_model("gpt2", init="random")
        hf_base = convert_linear_to_conv1d_copy(base)
        fan_in_fan_out = True
    else:
        base, _ = load_model(name)
        hf_base = AutoModelForCausalLM.from_pretrained(smollm2_cache_path(), dtype=torch.float32)
        fan_in_fan_out = False
    ours = copy.deepcopy(base)
    apply_method(ours, {"method": "lora", "targets": ["all-linear"], "rank": RANK, "alpha": ALPHA,
                        "extra_trainable": []})
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=PEFT_TARGETS[name], fan_in_fan_out=fan_in_fan_out)
    peft_model = peft.get_peft_model(hf_base, config)
    ours_trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    peft_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert ours_trainable == peft_trainable, (ours_trainable, peft_trainable)
    return base.to(device), ours.to(device), peft_model.to(device), ours_trainable


def convert_linear_to_conv1d_copy(model):
    plain = merge_and_strip(copy.deepcopy(model))
    convert_linear_to_conv1d(plain)
    return plain


def make_step(model, batch):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def make_forward(model, batch):
    @torch.no_grad()
    def forward() -> None:
        model(input_ids=batch)

    return forward


def interleaved(functions: dict, repeats: int, iterations: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each function: `repeats` samples, each the mean of `iterations` calls after a warm-up."""
    for function in functions.values():
        function()  # warm-up (allocations, optimizer state)
    samples: dict[str, list[float]] = {key: [] for key in functions}
    keys = list(functions)
    for repeat in range(repeats):
        for key in keys if repeat % 2 == 0 else reversed(keys):
            _sync(device)
            start = time.perf_counter()
            for _ in range(iterations):
                functions[key]()
            _sync(device)
            samples[key].append((time.perf_counter() - start) / iterations)
    return samples


def row(model_name: str, what: str, seconds: list[float], reference: float | None) -> str:
    median = statistics.median(seconds)
    ratio = f"{median / reference:.2f}x" if reference else "1.00x"
    return (f"| {model_name} | {what} | {median * 1e3:.0f} | {min(seconds) * 1e3:.0f}–{max(seconds) * 1e3:.0f} "
            f"| {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller batch (a smoke run)")
    parser.add_argument("--models", default="gpt2,smollm2-135m", help="comma-separated: gpt2, smollm2-135m")
    parser.add_argument("--repeats", type=int, default=None, help="timed samples per measurement (default 5, quick 3)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 (quick 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 128 (quick 64)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 5)
    batch_size = args.batch_size or (2 if args.quick else 8)
    seq_len = args.seq_len or (64 if args.quick else 128)
    iterations = 1 if args.quick else 2
    device = torch.device(args.device)

    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, batch {batch_size} x "
          f"{seq_len}, rank {RANK}, alpha {ALPHA}, {repeats} repeats x {iterations} iterations, interleaved\n")
    training_rows, inference_rows = [], []
    results: dict = {"device": str(device), "threads": torch.get_num_threads(), "batch": [batch_size, seq_len],
                     "rank": RANK, "alpha": ALPHA, "repeats": repeats, "iterations": iterations, "models": {}}
    for name in [item.strip() for item in args.models.split(",") if item.strip()]:
        torch.manual_seed(0)
        base, ours, peft_model, trainable = build_pair(name, device)
        batch = torch.randint(0, base.config.vocab_size, (batch_size, seq_len), device=device)
        ours.train()
        peft_model.train()
        steps = interleaved({"ours": make_step(ours, batch), "peft": make_step(peft_model, batch)}, repeats,
                            iterations, device)
        reference = statistics.median(steps["peft"])
        training_rows.append(row(name, f"train step, peftlab LoRA ({trainable:,} trainable)", steps["ours"], reference))
        training_rows.append(row(name, "train step, HF peft LoRA", steps["peft"], reference))

        base.eval()
        peft_model.eval()  # peft does not merge on eval, nor does peftlab unless asked
        ours.eval()
        merged = copy.deepcopy(ours)
        merge_adapters(merged)
        forwards = interleaved(
            {"base": make_forward(base, batch), "merged": make_forward(merged, batch),
             "unmerged": make_forward(ours, batch), "peft": make_forward(peft_model, batch)},
            repeats, iterations, device,
        )
        reference = statistics.median(forwards["base"])
        inference_rows.append(row(name, "inference, base model", forwards["base"], reference))
        inference_rows.append(row(name, "inference, peftlab merged", forwards["merged"], reference))
        inference_rows.append(row(name, "inference, peftlab un-merged", forwards["unmerged"], reference))
        inference_rows.append(row(name, "inference, HF peft un-merged", forwards["peft"], reference))
        results["models"][name] = {"trainable": trainable, "train_step_s": steps, "inference_s": forwards}
        del base, ours, peft_model, merged

    header = "| model | measurement | median ms | min–max ms | vs reference |\n|---|---|---:|---:|---:|"
    print("Training step (reference: HF peft)\n" + header)
    print("\n".join(training_rows))
    print("\nInference forward, no_grad (reference: base model)\n" + header)
    print("\n".join(inference_rows))
    out = Path(__file__).parent / "results" / ("lora-quick.json" if args.quick else "lora.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nraw samples: {out}")


if __name__ == "__main__":
    main()
