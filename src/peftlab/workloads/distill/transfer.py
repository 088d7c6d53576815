"""A transfer set for distillation: unlabelled sentences that the teacher labels with its logits.

Tang et al. 2019 built theirs by perturbing the training sentences (masking, n-grams); on CoLA that turns
acceptable sentences into unacceptable ones, so the teacher labels most copies "unacceptable". Here the base
language model writes new sentences instead, prompted with a few training sentences and the first words of
another, so the transfer set stays close to the training distribution and mostly grammatical, while the
teacher's judgement, not the copied label, is what the student learns from.

File format: UTF-8 text, one sentence per line; blank lines are ignored.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from peftlab.config import setting
from peftlab.data.datasets import get_dataset
from peftlab.errors import PeftlabError
from peftlab.fileio import write_text_atomic
from peftlab.models import load_model
from peftlab.generation import Sampling, decode
from peftlab.tasks.completion import line_stop_ids
from peftlab.workloads.distill.task import read_teacher_config

SENTENCE_ENDS = (".", "?", "!")
MAX_WORDS = 40


def complete_sentence(prefix: str, continuation: str) -> tuple[str | None, str]:
    """The sampled sentence `prefix + continuation` up to the end of its line, or None and why it was rejected."""
    line = (prefix + continuation).split("\n", 1)[0].strip()
    if not line.endswith(SENTENCE_ENDS):
        return None, "no sentence end on the line"
    if len(line.split()) > MAX_WORDS:
        return None, f"more than {MAX_WORDS} words"
    return line, "kept"


@dataclass
class SamplingSettings:
    size: int = setting(8000, "sentences to write")
    shots: int = setting(2, "training sentences shown before each prefix, so the model writes in their style")
    prefix_words: int = setting(2, "words of a training sentence that start each sample")
    temperature: float = setting(0.9, "sampling temperature")
    top_p: float = setting(0.95, "nucleus sampling threshold")
    top_k: int = setting(200, "sample among the k most likely tokens; 0 = all")
    max_new_tokens: int = setting(32, "tokens sampled per sentence at most")
    batch_size: int = setting(64, "prompts sampled together")
    seed: int = setting(0, "random seed; same seed, same sentences")


def check_sampling_settings(settings: SamplingSettings) -> None:
    checks = [
        (settings.size >= 1, f"--size must be >= 1, got {settings.size}"),
        (settings.shots >= 0, f"--shots must be >= 0, got {settings.shots}"),
        (settings.prefix_words >= 0, f"--prefix-words must be >= 0, got {settings.prefix_words}"),
        (settings.temperature > 0, f"--temperature must be > 0 (sampling), got {settings.temperature}"),
        (settings.top_k >= 0, f"--top-k must be >= 0 (0 = off), got {settings.top_k}"),
        (0 < settings.top_p <= 1, f"--top-p must be in (0, 1], got {settings.top_p}"),
        (settings.batch_size >= 1, f"--batch-size must be >= 1, got {settings.batch_size}"),
        (settings.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {settings.max_new_tokens}"),
    ]
    for ok, message in checks:
        if not ok:
            raise PeftlabError(message)


def sample_sentences(continue_prompts: Callable[[list[str], int], list[str]], training: Sequence[str],
                     settings: SamplingSettings) -> tuple[list[str], Counter]:
    """New sentences in the style of `training`, and what became of every sample (kept / why rejected).

    `continue_prompts(prompts, seed)` returns one sampled continuation per prompt. Duplicates and copies of
    training sentences are rejected. Stops after 4 × size samples if too few are kept, so a model that never
    ends a line cannot loop forever.
    """
    check_sampling_settings(settings)
    generator = random.Random(settings.seed)
    known, kept, outcomes = set(training), [], Counter()
    while len(kept) < settings.size and sum(outcomes.values()) < 4 * settings.size:
        prompts, prefixes = [], []
        for _ in range(settings.batch_size):
            shots = generator.sample(training, settings.shots)
            prefix = " ".join(generator.choice(training).split()[: settings.prefix_words])
            prompts.append("\n".join(shots + [prefix]) if shots else prefix)
            prefixes.append(prefix)
        for prefix, continuation in zip(prefixes, continue_prompts(prompts, generator.randrange(2**31))):
            sentence, outcome = complete_sentence(prefix, continuation)
            if sentence is not None and sentence in known:
                outcome = "duplicate or training sentence"
            elif sentence is not None and len(kept) == settings.size:
                outcome = "beyond --size"  # the rest of the last batch
            outcomes[outcome] += 1
            if outcome == "kept":
                known.add(sentence)
                kept.append(sentence)
    return kept, outcomes


def write_transfer_set(teacher: str, output: str | Path, settings: SamplingSettings) -> Path:
    """Sample a transfer set with the teacher run's base model (no adapter) from its task's training sentences."""
    check_sampling_settings(settings)
    config = read_teacher_config(teacher)
    model, tokenizer = load_model(config.model.name, task="causal-lm", init=config.model.init)
    training = [example.text for example in get_dataset(config.task.name).read("train", config.task.data_dir)]
    if settings.shots >= len(training):
        raise PeftlabError(f"--shots {settings.shots} needs more training sentences than the {len(training)} there are")

    stop_ids, sampled = line_stop_ids(tokenizer), 0

    def continue_prompts(prompts: list[str], seed: int) -> list[str]:
        nonlocal sampled
        token_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        sampling = Sampling(settings.temperature, settings.top_k, settings.top_p, seed)
        generated = decode(model, token_ids, settings.max_new_tokens, stop_ids, tokenizer.pad_token_id, sampling.picker())
        sampled += len(prompts)
        print(f"sampled {sampled} continuations", flush=True)
        return tokenizer.batch_decode(generated, skip_special_tokens=True)

    sentences, outcomes = sample_sentences(continue_prompts, training, settings)
    path = Path(output)
    write_text_atomic(path, "".join(sentence + "\n" for sentence in sentences))
    report = ", ".join(f"{outcome}: {count}" for outcome, count in outcomes.most_common())
    print(f"wrote {len(sentences)} sentences to {path} ({sum(outcomes.values())} samples; {report})")
    if len(sentences) < settings.size:
        print(f"warning: asked for {settings.size} sentences, got {len(sentences)}: the model rarely ended a line "
              "with a sentence; raise --max-new-tokens or lower --temperature")
    return path
