"""The `peftlab` command: subcommands map onto plain functions of the Python API; no logic of its own."""

from __future__ import annotations

import argparse
import sys

from peftlab.errors import PeftlabError

def _add_model_options(parser: argparse.ArgumentParser) -> None:
    from peftlab.models import DEFAULT_MODEL, INITS

    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"known model name (see `peftlab models`) or local Hugging Face directory (default: {DEFAULT_MODEL})"
    )
    parser.add_argument("--init", choices=INITS, default="pretrained", help="pretrained weights, or the architecture with random weights (default: pretrained)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto = cuda if available)")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftlab",
        description="Parameter-efficient fine-tuning, instruction tuning, QA and distillation for GPT-2-class models.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="continue prompts with a language model (W0)", description="Continue prompts with a language model (W0).")
    _add_model_options(generate)
    generate.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for a batch of prompts")
    generate.add_argument("--prompt-file", help="UTF-8 file with one prompt per line (blank lines are ignored)")
    generate.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most (default: 200)")
    generate.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default: 0.8)")
    generate.add_argument("--top-k", type=int, default=200, help="sample among the k most likely tokens; 0 = off (default: 200)")
    generate.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold; 1 = off (default: 0.95)")
    generate.add_argument("--num-samples", type=int, default=1, help="continuations per prompt (default: 1)")
    generate.add_argument("--seed", type=int, default=1337, help="random seed; same seed, same text (default: 1337)")
    generate.add_argument("--stream", action="store_true", help="print the text token by token as it is generated")
    generate.set_defaults(handler=_run_generate)

    models = commands.add_parser("models", help="list known models and whether they are available here")
    models.set_defaults(handler=_run_models)

    prepare = commands.add_parser("prepare", help="convert SmolLM2-135M from its GGUF into the fp32 cache (once)")
    prepare.add_argument("--force", action="store_true", help="convert again even if the cache is current")
    prepare.set_defaults(handler=_run_prepare)
    return parser


def _run_generate(args: argparse.Namespace) -> None:
    from peftlab.generate import generate, print_samples, read_prompt_file
    from peftlab.models import load_model, model_summary, resolve_device

    prompts = list(args.prompt) + (read_prompt_file(args.prompt_file) if args.prompt_file else [])
    if not prompts:
        raise PeftlabError("no prompt given: pass --prompt TEXT (repeatable) or --prompt-file FILE")
    device, dtype = resolve_device(args.device)
    model, tokenizer = load_model(args.model, init=args.init, dtype=dtype)
    model.to(device)
    print(model_summary(args.model, model), flush=True)
    settings = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        num_samples=args.num_samples,
        seed=args.seed,
    )
    if args.stream:
        for prompt in prompts:
            sys.stdout.write(f"--- {prompt!r} ---\n{prompt}")
            generate(model, tokenizer, [prompt], stream=sys.stdout, **settings)
        return
    print_samples(prompts, generate(model, tokenizer, prompts, **settings))


def _run_models(args: argparse.Namespace) -> None:
    from peftlab.models import DEFAULT_MODEL, KNOWN_MODELS, model_availability

    width = max(len(name) for name in KNOWN_MODELS)
    print(f"{'model':<{width}}  {'available':<9}  source / how to get it")
    for name, spec in KNOWN_MODELS.items():
        availability = model_availability(name)
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name:<{width}}  {'yes' if availability.available else 'no':<9}  {availability.source}  [{spec.description}]{default}")
    print("Any local Hugging Face model directory also works as --model PATH.")


def _run_prepare(args: argparse.Namespace) -> None:
    from peftlab.models import prepare_smollm2, smollm2_cache_is_current, smollm2_cache_path

    if not args.force and smollm2_cache_is_current():
        print(f"smollm2-135m: fp32 cache is current ({smollm2_cache_path()})")
        return
    print("smollm2-135m: converting the package's GGUF (Q4_1) to an fp32 checkpoint, once ...", flush=True)
    print(f"smollm2-135m: cached at {prepare_smollm2(force=args.force)}")


def _quiet_library_logs() -> None:
    """transformers' per-load progress bars and advice would drown peftlab's own output."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `peftlab` console script; returns the process exit code."""
    args = _build_parser().parse_args(argv)
    _quiet_library_logs()
    try:
        args.handler(args)
    except PeftlabError as error:
        print(f"peftlab {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
