"""Text generation (W0): prompts in, continuations out, on peftlab's one decoding loop (`peftlab.generation`).

What this layer adds: prompt validation against the model's context, several samples per prompt, and streaming
to a text stream; how tokens are sampled (temperature 0 = greedy, top-k, top-p, seed, stop strings) is one
`peftlab.sampling.Sampling`, whose defaults are the command's.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from peftlab.errors import PeftlabError
from peftlab.fileio import read_text
from peftlab.generation import TokenPicker, decode, token_picker
from peftlab.models import position_limit
from peftlab.peft.base import adapter_modules
from peftlab.peft.prefix import PrefixTuning
from peftlab.sampling import Sampling


def context_length(model) -> int:
    """Maximum sequence length (prompt + generated tokens) the model's position embeddings support."""
    limit = position_limit(model.config)
    if limit is None:
        raise PeftlabError(f"cannot tell the context length of {type(model).__name__}: its config has no "
                           "max_position_embeddings")
    return limit


def _tokens(count: int) -> str:
    return f"{count} token" if count == 1 else f"{count} tokens"


def _check_lengths(model, prompt_ids: list[list[int]], max_new_tokens: int) -> None:
    """Every prompt and its --max-new-tokens fit the positions the model reads (its context less a prefix-tuning
    prefix); the fix suggested is always one that can be followed."""
    limit = context_length(model)
    prefix = sum(module.length for _, module in adapter_modules(model) if isinstance(module, PrefixTuning))
    room = limit - prefix
    reads = f"the model's context of {limit} tokens" + (f" less its {prefix}-position prefix ({room} left)"
                                                         if prefix else "")
    for index, ids in enumerate(prompt_ids):
        length = len(ids)
        if length + max_new_tokens <= room:
            continue
        if length >= room:  # no room for even one new token: the prompt must be shortened
            keep = (f" ({length - room + max_new_tokens} to keep --max-new-tokens {max_new_tokens})"
                    if max_new_tokens < room else "")
            raise PeftlabError(
                f"prompt {index + 1} is {_tokens(length)}, which leaves no room in {reads}: no token can follow it. "
                f"Fix: shorten the prompt by at least {length - room + 1} tokens{keep}."
            )
        shorten = length + max_new_tokens - room
        also = f", or shorten the prompt by {shorten} tokens" if shorten < length else ""
        raise PeftlabError(
            f"prompt {index + 1} is {_tokens(length)}; with --max-new-tokens {max_new_tokens} that is "
            f"{length + max_new_tokens}, more than {reads}. Fix: lower --max-new-tokens to at most "
            f"{room - length}{also}."
        )


@dataclass(frozen=True)
class Completion:
    """One continuation: its text, and whether it ended with EOS (False: cut at max new tokens or a stop string,
    so the text does not end where the model would have ended it)."""

    text: str
    ended: bool


def generate(model, tokenizer, prompts: str | list[str], sampling: Sampling | None = None, num_samples: int = 1,
             stream: TextIO | None = None) -> list[list[str]]:
    """Continue each prompt; returns, per prompt, `num_samples` continuations (generated text only).

    Args:
        model: a causal LM (e.g. from `peftlab.models.load_model`).
        tokenizer: its tokenizer (with a pad token).
        prompts: one prompt or a list of prompts, generated as one batch (every sample of every prompt).
        sampling: temperature (0 = greedy), top-k, top-p, seed, max new tokens and stop strings; None = the
            defaults of `peftlab generate` (`Sampling()`). The same seed gives the same text. Generation also
            stops at EOS.
        num_samples: continuations per prompt.
        stream: if given, generate prompt by prompt and sample by sample and write the text to this stream
            token by token (e.g. `sys.stdout`). The same seed again gives the same streamed text, which may
            differ from the batched result because the random draws happen in another order.
    """
    if stream is None:
        return [[completion.text for completion in row] for row in complete(model, tokenizer, prompts, sampling,
                                                                            num_samples)]
    prompt_ids, sampling, pick_next = _prepared(model, tokenizer, prompts, sampling, num_samples)
    return [[_stream_one(model, tokenizer, ids, sampling, pick_next, stream) for _ in range(num_samples)]
            for ids in prompt_ids]


def complete(model, tokenizer, prompts: str | list[str], sampling: Sampling | None = None,
             num_samples: int = 1) -> list[list[Completion]]:
    """`generate` as one batch, each continuation with whether it ended with EOS (what `peftlab preferences`
    records, so DPO trains an EOS only after a completion that had one)."""
    prompt_ids, sampling, pick_next = _prepared(model, tokenizer, prompts, sampling, num_samples)
    rows = [ids for ids in prompt_ids for _ in range(num_samples)]  # prompt-major, like num_return_sequences
    generated = _decode(model, tokenizer, rows, sampling, pick_next)
    decoded = tokenizer.batch_decode(generated, skip_special_tokens=True)
    completions = [Completion(text, bool(tokens) and tokens[-1] == tokenizer.eos_token_id)
                   for text, tokens in zip(decoded, generated)]
    return [completions[index * num_samples : (index + 1) * num_samples] for index in range(len(prompt_ids))]


def _prepared(model, tokenizer, prompts: str | list[str], sampling: Sampling | None,
              num_samples: int) -> tuple[list[list[int]], Sampling, TokenPicker | None]:
    """(each prompt's token ids, the settings, the token picker), every input checked; the model in eval mode."""
    sampling = sampling or Sampling()
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list:
        raise PeftlabError("no prompt given: pass --prompt TEXT or --prompt-file FILE")
    if num_samples < 1:
        raise PeftlabError(f"--num-samples must be >= 1, got {num_samples}")
    pick_next = token_picker(sampling)  # checks the settings
    if num_samples > 1 and sampling.greedy:
        raise PeftlabError(
            f"--num-samples {num_samples} with --temperature 0: greedy decoding gives the same text every time. "
            "Fix: sample with --temperature > 0, or ask for one sample."
        )
    texts = [prompt if prompt else tokenizer.eos_token for prompt in prompt_list]  # empty prompt: start from EOS
    prompt_ids = tokenizer(texts)["input_ids"]
    _check_lengths(model, prompt_ids, sampling.max_new_tokens)
    model.eval()
    return prompt_ids, sampling, pick_next


def _decode(model, tokenizer, rows: list[list[int]], sampling: Sampling, pick_next: TokenPicker | None,
            on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """`decode` with the settings' length and stop strings; EOS ends a row."""
    return decode(model, rows, sampling.max_new_tokens, {tokenizer.eos_token_id}, tokenizer.pad_token_id, pick_next,
                  on_token=on_token, stop_strings=sampling.stop,
                  detokenize=lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True))


def _stream_one(model, tokenizer, prompt_ids: list[int], sampling: Sampling, pick_next: TokenPicker | None,
                stream: TextIO) -> str:
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

    _decode(model, tokenizer, [prompt_ids], sampling, pick_next, on_token=write_new_text)
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


def chat_prompts(tokenizer, prompts: list[str], model_name: str) -> list[str]:
    """Each prompt as a user message in the tokenizer's chat template, the assistant's turn opened (`--chat`)."""
    if not getattr(tokenizer, "chat_template", None):
        raise PeftlabError(f"--chat: the tokenizer of {model_name} has no chat template (it is not a chat or instruct "
                           "model). Fix: drop --chat, or use an instruct model such as smollm2-135m")
    return [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                          add_generation_prompt=True) for prompt in prompts]


def print_samples(prompts: list[str], samples: list[list[str]], out: TextIO | None = None) -> None:
    """Print each prompt followed by its continuation, samples separated by a rule (to stdout by default)."""
    out = out or sys.stdout
    for prompt_index, (prompt, continuations) in enumerate(zip(prompts, samples), start=1):
        for sample_index, continuation in enumerate(continuations, start=1):
            out.write(f"--- prompt {prompt_index}, sample {sample_index} ---\n{prompt}{continuation}\n")
