"""Text generation (W0): a thin layer over transformers' `generate` (KV cache, sampling) with peftlab's checks.

What this layer adds: prompt validation against the model's context, left padding for batches of prompts,
temperature 0 meaning greedy, seeded reproducibility, and streaming to a text stream.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import torch

from peftlab.errors import PeftlabError
from peftlab.fileio import read_text


def context_length(model) -> int:
    """Maximum sequence length (prompt + generated tokens) the model's position embeddings support."""
    config = model.config
    for attribute in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attribute, None)
        if value:
            return int(value)
    raise PeftlabError(f"cannot tell the context length of {type(model).__name__}: its config has no max_position_embeddings")


def sampling_arguments(temperature: float, top_k: int | None, top_p: float | None) -> dict:
    """Keyword arguments for `model.generate`: greedy when temperature is 0, else sampling with the filters."""
    if temperature < 0:
        raise PeftlabError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise PeftlabError(f"--top-k must be >= 0 (0 = off), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise PeftlabError(f"--top-p must be in (0, 1] (1 = off), got {top_p}")
    if temperature == 0:
        return {"do_sample": False}
    # top_k=0 / top_p=1 disable the filter; transformers' own defaults must not sneak in either.
    return {"do_sample": True, "temperature": temperature, "top_k": top_k or 0, "top_p": top_p or 1.0}


def _encode(tokenizer, prompts: list[str], device: torch.device) -> dict:
    """Left-padded batch: generation appends on the right, so every prompt must end at the same column."""
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        texts = [prompt if prompt else tokenizer.eos_token for prompt in prompts]  # empty prompt: start from EOS
        return tokenizer(texts, return_tensors="pt", padding=True).to(device)
    finally:
        tokenizer.padding_side = previous_side


def _check_lengths(model, batch, max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise PeftlabError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    limit = context_length(model)
    lengths = batch["attention_mask"].sum(-1).tolist()
    for index, length in enumerate(lengths):
        if length + max_new_tokens > limit:
            raise PeftlabError(
                f"prompt {index + 1} is {length} tokens; with --max-new-tokens {max_new_tokens} that exceeds the "
                f"model's context of {limit} tokens. Fix: shorten the prompt to at most {limit - max_new_tokens} "
                f"tokens or lower --max-new-tokens to at most {max(limit - length, 0)}."
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
        prompts: one prompt or a list of prompts, generated as one left-padded batch.
        max_new_tokens: tokens to generate at most (generation also stops at EOS).
        temperature: softmax temperature; 0 means greedy decoding.
        top_k: keep only the k most likely tokens before sampling (0 or None = off).
        top_p: nucleus sampling threshold (1 or None = off).
        num_samples: continuations per prompt.
        seed: seeds torch's generator first, so the same seed gives the same text.
        stream: if given, generate prompt by prompt and sample by sample and write the text to this stream
            token by token (e.g. `sys.stdout`). The same seed again gives the same streamed text, which may
            differ from the batched result because the random draws happen in another order.
    """
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list:
        raise PeftlabError("no prompt given: pass --prompt TEXT or --prompt-file FILE")
    if num_samples < 1:
        raise PeftlabError(f"--num-samples must be >= 1, got {num_samples}")
    arguments = sampling_arguments(temperature, top_k, top_p)
    if num_samples > 1 and not arguments["do_sample"]:
        raise PeftlabError(
            f"--num-samples {num_samples} with --temperature 0: greedy decoding gives the same text every time. "
            "Fix: sample with --temperature > 0, or ask for one sample."
        )
    device = next(model.parameters()).device
    batch = _encode(tokenizer, prompt_list, device)
    _check_lengths(model, batch, max_new_tokens)
    if seed is not None:
        torch.manual_seed(seed)
    arguments.update(
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model.eval()
    if stream is not None:
        return [_stream_one(model, tokenizer, prompt, num_samples, arguments, stream) for prompt in prompt_list]
    with torch.inference_mode():
        output = model.generate(**batch, num_return_sequences=num_samples, **arguments)  # (P*S, T_prompt+T_new)
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [texts[index * num_samples : (index + 1) * num_samples] for index in range(len(prompt_list))]


def _stream_one(model, tokenizer, prompt: str, num_samples: int, arguments: dict, stream: TextIO) -> list[str]:
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            stream.write(text + ("\n" if stream_end else ""))
            stream.flush()

    batch = _encode(tokenizer, [prompt], next(model.parameters()).device)
    samples = []
    for _ in range(num_samples):
        streamer = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        with torch.inference_mode():
            output = model.generate(**batch, streamer=streamer, **arguments)
        samples.append(tokenizer.decode(output[0, batch["input_ids"].shape[1] :], skip_special_tokens=True))
    return samples


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
