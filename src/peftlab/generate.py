"""Text generation (W0): prompts in, continuations out, on peftlab's one decoding loop (`peftlab.generation`).

What this layer adds: prompt validation against the model's context, temperature 0 meaning greedy, several
samples per prompt, seeded reproducibility, and streaming to a text stream.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import TextIO

from peftlab.errors import PeftlabError
from peftlab.fileio import read_text
from peftlab.generation import Sampling, decode


def context_length(model) -> int:
    """Maximum sequence length (prompt + generated tokens) the model's position embeddings support."""
    config = model.config
    for attribute in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attribute, None)
        if value:
            return int(value)
    raise PeftlabError(f"cannot tell the context length of {type(model).__name__}: its config has no max_position_embeddings")


def _check_lengths(model, prompt_ids: list[list[int]], max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise PeftlabError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    limit = context_length(model)
    for index, ids in enumerate(prompt_ids):
        if len(ids) + max_new_tokens > limit:
            raise PeftlabError(
                f"prompt {index + 1} is {len(ids)} tokens; with --max-new-tokens {max_new_tokens} that exceeds the "
                f"model's context of {limit} tokens. Fix: shorten the prompt to at most {limit - max_new_tokens} "
                f"tokens or lower --max-new-tokens to at most {max(limit - len(ids), 0)}."
            )


def generate(
    model,
    tokenizer,
    prompts: str | list[str],
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 200,
    top_p: float | None = 0.95,
    num_samples: int = 1,
    seed: int | None = None,
    stream: TextIO | None = None,
) -> list[list[str]]:
    """Continue each prompt; returns, per prompt, `num_samples` continuations (generated text only).

    Args:
        model: a causal LM (e.g. from `peftlab.models.load_model`).
        tokenizer: its tokenizer (with a pad token).
        prompts: one prompt or a list of prompts, generated as one batch (every sample of every prompt).
        max_new_tokens: tokens to generate at most (generation also stops at EOS).
        temperature: softmax temperature; 0 means greedy decoding.
        top_k: keep only the k most likely tokens before sampling (0 or None = off).
        top_p: nucleus sampling threshold (1 or None = off).
        num_samples: continuations per prompt.
        seed: the sampler's seed: the same seed gives the same text (None: a fresh one).
        stream: if given, generate prompt by prompt and sample by sample and write the text to this stream
            token by token (e.g. `sys.stdout`). The same seed again gives the same streamed text, which may
            differ from the batched result because the random draws happen in another order.
    """
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list:
        raise PeftlabError("no prompt given: pass --prompt TEXT or --prompt-file FILE")
    if num_samples < 1:
        raise PeftlabError(f"--num-samples must be >= 1, got {num_samples}")
    sampling = Sampling(temperature, 0 if top_k is None else top_k, 1.0 if top_p is None else top_p,
                        seed if seed is not None else random.SystemRandom().randrange(2**63))
    if num_samples > 1 and sampling.greedy:
        raise PeftlabError(
            f"--num-samples {num_samples} with --temperature 0: greedy decoding gives the same text every time. "
            "Fix: sample with --temperature > 0, or ask for one sample."
        )
    texts = [prompt if prompt else tokenizer.eos_token for prompt in prompt_list]  # empty prompt: start from EOS
    prompt_ids = tokenizer(texts)["input_ids"]
    _check_lengths(model, prompt_ids, max_new_tokens)
    model.eval()
    pick_next, stops = sampling.picker(), {tokenizer.eos_token_id}
    if stream is not None:
        return [[_stream_one(model, tokenizer, ids, max_new_tokens, pick_next, stream) for _ in range(num_samples)]
                for ids in prompt_ids]
    rows = [ids for ids in prompt_ids for _ in range(num_samples)]  # prompt-major, like num_return_sequences
    generated = decode(model, rows, max_new_tokens, stops, tokenizer.pad_token_id, pick_next)
    decoded = tokenizer.batch_decode(generated, skip_special_tokens=True)
    return [decoded[index * num_samples : (index + 1) * num_samples] for index in range(len(prompt_list))]


def _stream_one(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, pick_next, stream: TextIO) -> str:
    """One continuation, written to `stream` as it is generated; returns its text."""
    tokens: list[int] = []
    written = 0

    def write_new_text(row: int, token: int) -> None:
        nonlocal written
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # a character whose bytes are still incomplete waits for the next token
            stream.write(text[written:])
            stream.flush()
            written = len(text)

    decode(model, [prompt_ids], max_new_tokens, {tokenizer.eos_token_id}, tokenizer.pad_token_id, pick_next,
           on_token=write_new_text)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    stream.write(text[written:] + "\n")
    stream.flush()
    return text


def read_prompt_file(path: str) -> list[str]:
    """Prompts from a UTF-8 text file, one per line; blank lines are separators and are ignored."""
    lines = read_text(Path(path), "prompt file").splitlines()
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise PeftlabError(f"prompt file {path} has no prompt: write one prompt per line")
    return prompts


def print_samples(prompts: list[str], samples: list[list[str]], out: TextIO | None = None) -> None:
    """Print each prompt followed by its continuation, samples separated by a rule (to stdout by default)."""
    out = out or sys.stdout
    for prompt_index, (prompt, continuations) in enumerate(zip(prompts, samples), start=1):
        for sample_index, continuation in enumerate(continuations, start=1):
            out.write(f"--- prompt {prompt_index}, sample {sample_index} ---\n{prompt}{continuation}\n")
