"""`peftlab prepare`: SmolLM2-135M's fp32 cache, converted once from the package's GGUF."""

from __future__ import annotations

import argparse

from peftlab.catalog import smollm2_cache_is_current, smollm2_cache_path
from peftlab.models import prepare_smollm2


def run_prepare(args: argparse.Namespace) -> None:
    if not args.force and smollm2_cache_is_current():
        print(f"smollm2-135m: fp32 cache is current ({smollm2_cache_path()})")
        return
    print("smollm2-135m: converting the package's GGUF (Q4_1) to an fp32 checkpoint, once ...", flush=True)
    print(f"smollm2-135m: cached at {prepare_smollm2(force=args.force)}")
