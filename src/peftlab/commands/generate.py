"""`peftlab generate`: continue prompts with a model, or with a run's language model (base + adapter) in the run's
own prompt format (`Workload.prompt_text`: an instruct run's template, a qa run's context and question), unless
--raw or --chat."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from peftlab.errors import PeftlabError
from peftlab.generate import chat_prompts, generate, print_samples, read_prompt_file
from peftlab.models import load_model, model_summary, resolve_device
from peftlab.options import apply_options, sampling_options
from peftlab.sampling import Sampling
from peftlab.settings import expand_escapes
from peftlab.weights import pack_for_decoding
from peftlab.workloads.loading import load_run, workload_for


def run_generate(args: argparse.Namespace) -> None:
    prompts = [expand_escapes(prompt) for prompt in args.prompt]
    prompts += read_prompt_file(args.prompt_file) if args.prompt_file else []
    if not prompts:
        raise PeftlabError("no prompt given: pass --prompt TEXT (repeatable) or --prompt-file FILE")
    sampling = Sampling()
    apply_options(sampling, args, sampling_options())
    sampling.check()  # before the model loads
    if (Path(args.model) / "config.yaml").is_file():  # a run: its base model with its adapter
        model, tokenizer, run_format = run_language_model(args.model, args.checkpoint)
        if not (args.raw or args.chat):
            prompts = [run_format(prompt, f"prompt {number}") for number, prompt in enumerate(prompts, 1)]
    else:
        device, dtype = resolve_device(args.device)
        model, tokenizer = load_model(args.model, init=args.init, dtype=dtype)
        model.to(device)
    if args.chat:
        prompts = chat_prompts(tokenizer, prompts, args.model)
    print(model_summary(args.model, model), flush=True)
    pack_for_decoding(model.eval(), args.weights)
    if args.stream:
        for prompt in prompts:
            sys.stdout.write(f"--- {prompt!r} ---\n{prompt}")
            generate(model, tokenizer, [prompt], sampling, args.num_samples, stream=sys.stdout)
        return
    print_samples(prompts, generate(model, tokenizer, prompts, sampling, args.num_samples))


def run_language_model(run_dir: str, checkpoint: str):
    """A run's language model (base + adapter), tokenizer, and its prompt format: (text, origin) -> the prompt the
    run was trained to continue, for `peftlab generate --model RUN_DIR`."""
    config, task, model = load_run(run_dir, checkpoint)
    if task.model_task != "causal-lm":
        raise PeftlabError(f"{run_dir} trained a {task.model_task} model; generate needs a language-model run "
                           f"(instruct or qa). Fix: `peftlab predict {run_dir} --text ...` runs it on your inputs")
    workload = workload_for(config)

    def run_format(text: str, origin: str) -> str:
        return workload.prompt_text(task, workload.input_from_text(text, origin))

    return model, task.tokenizer, run_format
