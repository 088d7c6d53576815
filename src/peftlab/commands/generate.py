"""`peftlab generate`: continue prompts with a model, or with a run's language model (base + adapter)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from peftlab.errors import PeftlabError
from peftlab.generate import generate, print_samples, read_prompt_file
from peftlab.models import load_model, model_summary, resolve_device
from peftlab.options import apply_options, sampling_options
from peftlab.sampling import Sampling
from peftlab.workloads.loading import load_run


def run_generate(args: argparse.Namespace) -> None:
    prompts = list(args.prompt) + (read_prompt_file(args.prompt_file) if args.prompt_file else [])
    if not prompts:
        raise PeftlabError("no prompt given: pass --prompt TEXT (repeatable) or --prompt-file FILE")
    sampling = Sampling()
    apply_options(sampling, args, sampling_options())
    sampling.check()  # before the model loads
    if (Path(args.model) / "config.yaml").is_file():  # a run: its base model with its adapter
        model, tokenizer = run_language_model(args.model, args.checkpoint)
    else:
        device, dtype = resolve_device(args.device)
        model, tokenizer = load_model(args.model, init=args.init, dtype=dtype)
        model.to(device)
    print(model_summary(args.model, model), flush=True)
    if args.stream:
        for prompt in prompts:
            sys.stdout.write(f"--- {prompt!r} ---\n{prompt}")
            generate(model, tokenizer, [prompt], sampling, args.num_samples, stream=sys.stdout)
        return
    print_samples(prompts, generate(model, tokenizer, prompts, sampling, args.num_samples))


def run_language_model(run_dir: str, checkpoint: str):
    """A run's language model (base + adapter) and tokenizer, for `peftlab generate --model RUN_DIR`."""
    _, task, model = load_run(run_dir, checkpoint)
    if task.model_task != "causal-lm":
        raise PeftlabError(f"{run_dir} trained a {task.model_task} model; generate needs a language-model run "
                           "(instruct or qa)")
    return model, task.tokenizer
