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
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from peftlab.data.datasets import get_dataset
from peftlab.errors import PeftlabError
from peftlab.fileio import write_text_atomic
from peftlab.generation import decode, token_picker
from peftlab.models import load_model
from peftlab.tasks.completion import line_stop_ids
from peftlab.workloads.distill.task import read_teacher_config
from peftlab.workloads.distill.transfer_settings import TransferSettings, check_transfer_settings

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


def sample_sentences(continue_prompts: Callable[[list[str], int], list[str]], training: Sequence[str],
                     settings: TransferSettings) -> tuple[list[str], Counter]:
    """New sentences in the style of `training`, and what became of every sample (kept / why rejected).

    `continue_prompts(prompts, seed)` returns one sampled continuation per prompt. Duplicates and copies of
    training sentences are rejected. Stops after 4 × size samples if too few are kept, so a model that never
    ends a line cannot loop forever.
    """
    check_transfer_settings(settings)
    generator = random.Random(settings.sampling.seed)
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


def write_transfer_set(teacher: str, output: str | Path, settings: TransferSettings) -> Path:
    """Sample a transfer set with the teacher run's base model (no adapter) from its task's training sentences."""
    check_transfer_settings(settings)
    config = read_teacher_config(teacher)
    model, tokenizer = load_model(config.model.name, task="causal-lm", init=config.model.init)
    training = [example.text for example in get_dataset(config.task.name).read("train", config.task.data_dir)]
    if settings.shots >= len(training):
        raise PeftlabError(f"--shots {settings.shots} needs more training sentences than the {len(training)} there are")

    stop_ids, sampled = line_stop_ids(tokenizer), 0

    def continue_prompts(prompts: list[str], seed: int) -> list[str]:
        nonlocal sampled
        token_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        sampling = replace(settings.sampling, seed=seed)
        generated = decode(model, token_ids, sampling.max_new_tokens, stop_ids, tokenizer.pad_token_id,
                           token_picker(sampling), stop_strings=sampling.stop,
                           detokenize=lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True))
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
