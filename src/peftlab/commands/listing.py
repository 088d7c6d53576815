"""`peftlab recipes` and `peftlab models`: what is available, read without importing torch or transformers."""

from __future__ import annotations

import argparse

from peftlab.catalog import DEFAULT_MODEL, KNOWN_MODELS, model_availability
from peftlab.recipes import recipe_names, recipe_path, recipe_summary


def run_recipes(args: argparse.Namespace) -> None:
    for name in recipe_names():
        print(f"{name}: {recipe_summary(name)}\n  {recipe_path(name)}")
    print("Use: peftlab train --recipe NAME [--set SECTION.KEY=VALUE] [options]; --dry-run shows the resolved plan.")


def run_models(args: argparse.Namespace) -> None:
    width = max(len(name) for name in KNOWN_MODELS)
    print(f"{'model':<{width}}  {'available':<9}  source / how to get it")
    for name, spec in KNOWN_MODELS.items():
        availability = model_availability(name)
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name:<{width}}  {'yes' if availability.available else 'no':<9}  {availability.source}  "
              f"[{spec.description}]{default}")
    print("Any local Hugging Face model directory also works as --model PATH.")
