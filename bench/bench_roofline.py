"""This machine's limits for decoding: memory bandwidth, fp32 matrix-multiply rate, and the decode bound they set.

    .venv/bin/python bench/bench_roofline.py [--repeats 5]
    .venv/bin/python bench/bench_roofline.py --shapes [--repeats 5]

A decoding step reads every weight once (the tied output embedding once: SmolLM2-135M fp32 is ~538 MB) and does
2 FLOPs per weight per row, so one step takes at least max(weight bytes / bandwidth, rows * 2 * weights / matmul
rate): at batch 1 the bandwidth bound, at larger batch it moves toward the compute bound. bench_generate.py prints
these bounds beside its measured tokens/s. Bandwidth is the median of `--repeats` timings of reading a 512 MB
tensor (a sum) and of copying it (read + write bytes); the matmul rate is that of 2048 x 2048 fp32 products.

--shapes: the products of one SmolLM2 decode step, each shape as 30 distinct weights (one per layer, so they come
from memory, not from a cache), at batch 1 and 8: GB/s of `F.linear` against `decode_step.blocked_product`
(blocks of output rows on every thread), beside a sum over the same weights (what reading them costs); writes
bench/results/roofline_shapes.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from peftlab.decode_step import blocked_product, projection_parts, weight_blocks
from peftlab.fileio import write_text_atomic
from peftlab.models import load_model

TENSOR_BYTES = 512 * 2**20  # far past every cache level
MATMUL_SIZE = 2048


def timed(function, repeats: int) -> list[float]:
    function()  # warm-up: page faults, kernel selection
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return seconds


def memory_bandwidth(repeats: int) -> dict[str, float]:
    """GB/s reading a large fp32 tensor (a sum) and copying it (bytes read + written)."""
    source = torch.ones(TENSOR_BYTES // 4)
    target = torch.empty_like(source)
    read = statistics.median(timed(source.sum, repeats))
    copy = statistics.median(timed(lambda: target.copy_(source), repeats))
    return {"read_gb_s": TENSOR_BYTES / read / 1e9, "copy_gb_s": 2 * TENSOR_BYTES / copy / 1e9}


def matmul_gflops(repeats: int) -> float:
    a, b = torch.randn(MATMUL_SIZE, MATMUL_SIZE), torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    return 2 * MATMUL_SIZE**3 / statistics.median(timed(lambda: a @ b, repeats)) / 1e9


def weight_footprint(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes, count) of the model's weights, each tensor once (a tied embedding is one tensor)."""
    tensors = {parameter.data_ptr(): parameter for parameter in model.parameters()}.values()
    return sum(t.numel() * t.element_size() for t in tensors), sum(t.numel() for t in tensors)


def decode_bounds(weight_bytes: int, weights: int, rows: int, limits: dict[str, float]) -> dict[str, float]:
    """Tokens/s at most for a step over `rows` rows: the bandwidth bound, the compute bound and the tighter one.
    The embedding lookup reads only `rows` rows but its tied copy is the output projection, read whole."""
    bandwidth_s = weight_bytes / (limits["read_gb_s"] * 1e9)
    compute_s = rows * 2 * weights / (limits["matmul_gflops"] * 1e9)
    return {"bandwidth_tokens_per_s": rows / bandwidth_s, "compute_tokens_per_s": rows / compute_s,
            "bound_tokens_per_s": rows / max(bandwidth_s, compute_s)}


def machine_limits(repeats: int) -> dict[str, float]:
    return memory_bandwidth(repeats) | {"matmul_gflops": matmul_gflops(repeats), "threads": torch.get_num_threads()}


SMOLLM2_SHAPES = {"q,k,v fused (960 x 576)": (960, 576), "o (576 x 576)": (576, 576),
                  "gate,up fused (3072 x 576)": (3072, 576), "down (576 x 1536)": (576, 1536),
                  "output embedding (49152 x 576)": (49152, 576)}
LAYERS = 30


def product_rates(repeats: int) -> dict[str, dict[str, float]]:
    """GB/s of reading each shape's weights through F.linear, through blocked_product, and through a sum."""
    parts = projection_parts()
    rates = {}
    for name, (outputs, inputs) in SMOLLM2_SHAPES.items():
        count = 1 if outputs > 10_000 else LAYERS
        weights = [torch.randn(outputs, inputs) for _ in range(count)]
        blocks = [weight_blocks(weight, parts) for weight in weights]
        gigabytes = count * outputs * inputs * 4 / 1e9
        for rows in (1, 8):
            x = torch.randn(rows, inputs)
            sides = {"F.linear": lambda: [F.linear(x, weight) for weight in weights],
                     f"blocked ({parts} blocks)": lambda: [blocked_product(x, block) for block in blocks],
                     "sum (read only)": lambda: [weight.sum() for weight in weights]}
            rates[f"{name}, batch {rows}"] = {side: gigabytes / statistics.median(timed(run, repeats))
                                              for side, run in sides.items()}
    return rates


def shapes(repeats: int) -> None:
    rates = product_rates(repeats)
    sides = list(next(iter(rates.values())))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; GB/s, median of {repeats}\n")
    print("| product | " + " | ".join(sides) + " |")
    print("|---|" + "---|" * len(sides))
    for name, row in rates.items():
        print(f"| {name} | " + " | ".join(f"{row[side]:.1f}" for side in sides) + " |")
    out = Path(__file__).parent / "results" / "roofline_shapes.json"
    write_text_atomic(out, json.dumps(rates, indent=2))
    print(f"\nraw numbers: {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", action="store_true",
                        help="one-row products of SmolLM2's shapes: F.linear vs blocks")
    args = parser.parse_args()
    if args.shapes:
        return shapes(args.repeats)

    limits = machine_limits(args.repeats)
    model, _ = load_model("smollm2-135m")
    weight_bytes, weights = weight_footprint(model)
    bounds = {rows: decode_bounds(weight_bytes, weights, rows, limits) for rows in (1, 8, 64)}
    print(f"torch {torch.__version__}, {limits['threads']} threads; median of {args.repeats}")
    print(f"memory read {limits['read_gb_s']:.1f} GB/s, copy {limits['copy_gb_s']:.1f} GB/s; "
          f"fp32 matmul {limits['matmul_gflops']:.0f} GFLOP/s")
    print(f"smollm2-135m fp32 weights: {weight_bytes / 1e6:.0f} MB, {weights / 1e6:.1f} M\n")
    print("| batch | bandwidth bound tokens/s | compute bound tokens/s | decode bound tokens/s |")
    print("|---|---|---|---|")
    for rows, bound in bounds.items():
        print(f"| {rows} | {bound['bandwidth_tokens_per_s']:.1f} | {bound['compute_tokens_per_s']:.1f} | "
              f"{bound['bound_tokens_per_s']:.1f} |")
    out = Path(__file__).parent / "results" / "roofline.json"
    write_text_atomic(out, json.dumps({"limits": limits, "weight_bytes": weight_bytes, "weights": weights,
                               "bounds": bounds}, indent=2))
    print(f"\nraw numbers: {out}")


if __name__ == "__main__":
    main()
