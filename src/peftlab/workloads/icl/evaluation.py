"""The k-shot evaluation: test and demonstration examples, demonstration sets drawn per seed, prompts tokenised
whole, the context budget checked for every (seed, k) before anything is scored, then each set scored with its
demonstrations computed once (`scoring.SharedRows`).

Demonstration sets are nested: a seed draws one order of training examples and k shots are its first k, so a
larger k adds demonstrations to the smaller k's set (a seed's curve over k varies k alone).
"""

from __future__ import annotations

import random
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from peftlab.data.datasets import get_dataset
from peftlab.errors import PeftlabError
from peftlab.tasks.completion import line_stop_ids
from peftlab.tasks.metrics import classification_metrics
from peftlab.workloads.icl import IclConfig
from peftlab.workloads.icl.scoring import (
    SharedRows,
    choice_loglikelihoods,
    content_free_prior,
    greedy_continuations,
    label_predictions,
)
from peftlab.workloads.icl.templates import (
    ANSWER_MARKER,
    CONTENT_FREE,
    DEMONSTRATION_SEPARATOR,
    PromptFormat,
    demonstration_answer,
    extracted_answer,
    read_problems,
    same_answer,
)
from peftlab.tasks.metrics import exact_match, f1_score

UNPARSABLE = -1
ANSWER_STEP_TOKENS = 8  # zero-shot chain of thought: tokens generated after the answer marker


@dataclass(frozen=True)
class IclExample:
    fields: dict  # what the format is filled with: {"text"} (classification) or {"context", "question"} (squad)
    answer: str  # what a demonstration of it answers (its label's verbaliser; squad: the first reference answer)
    label: int  # classification label; -1 for squad
    references: tuple[str, ...]  # squad: every reference answer
    origin: str  # file:line


def read_examples(task: str, split: str, data_dir: str | None, prompt_format: PromptFormat) -> list[IclExample]:
    """A split of a dataset as in-context examples (a demonstration's answer: its label's verbaliser, or its first
    reference answer)."""
    examples = get_dataset(task).read(split, data_dir)
    if task == "squad":
        return [IclExample({"context": e.context, "question": e.question}, e.answers[0], -1, tuple(e.answers),
                           e.origin) for e in examples]
    return [IclExample({"text": e.text}, prompt_format.verbalizers[e.label], e.label, (), e.origin) for e in examples]


def read_problems_split(settings: IclConfig) -> tuple[list[IclExample], list[IclExample]]:
    """Task cot: (the demonstration pool: the file's first --demonstration-pool problems, the problems evaluated:
    the rest)."""
    problems = [IclExample({"text": problem.input}, demonstration_answer(problem, settings.reasoning), -1,
                           (problem.answer,), problem.origin) for problem in read_problems(settings.demonstrations)]
    pool, test = problems[: settings.demonstration_pool], problems[settings.demonstration_pool :]
    if not test:
        raise PeftlabError(f"{settings.demonstrations}: all {len(problems)} problems are in the demonstration pool "
                           f"(--demonstration-pool {settings.demonstration_pool}); none is left to evaluate")
    return pool, test


def demonstration_order(pool: Sequence[IclExample], count: int, seed: int, balanced: bool) -> list[int]:
    """`count` distinct indices into `pool`, drawn with `seed`; `balanced`: the labels in turn (the first label drawn
    too), each label's examples in a seeded order."""
    generator = random.Random(seed)
    if count > len(pool):
        raise PeftlabError(f"{count} demonstrations asked for, but the training split has {len(pool)} examples")
    if not balanced:
        return generator.sample(range(len(pool)), count)
    by_label: dict[int, list[int]] = {}
    for index, example in enumerate(pool):
        by_label.setdefault(example.label, []).append(index)
    labels = sorted(by_label)
    for label in labels:
        generator.shuffle(by_label[label])
    start = generator.randrange(len(labels))
    turns = [labels[(start + turn) % len(labels)] for turn in range(count)]
    if any(turns.count(label) > len(by_label[label]) for label in labels):
        raise PeftlabError(f"--balanced: {count} demonstrations need more examples of a label than the training "
                           "split has")
    taken = {label: iter(by_label[label]) for label in labels}
    return [next(taken[label]) for label in turns]


class PromptBuilder:
    """Whole prompts as lm-evaluation-harness writes them (see `templates`), or as chat turns, tokenised."""

    def __init__(self, prompt_format: PromptFormat, tokenizer, chat: bool, trigger: str = ""):
        """`trigger`: the start of every test example's answer (zero-shot chain of thought)."""
        self.format, self.tokenizer, self.chat, self.trigger = prompt_format, tokenizer, chat, trigger

    def text(self, demonstrations: Sequence[IclExample], fields: dict) -> str:
        if self.chat:
            messages = [turn for demonstration in demonstrations for turn in (
                {"role": "user", "content": self.format.prompt(demonstration.fields)},
                {"role": "assistant", "content": demonstration.answer})]
            messages.append({"role": "user", "content": self.format.prompt(fields)})
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True) + self.trigger
        shown = [self.format.prompt(d.fields) + self.format.answer(d.answer) for d in demonstrations]
        test = self.format.prompt(fields) + (self.format.answer(self.trigger) if self.trigger else "")
        return DEMONSTRATION_SEPARATOR.join(shown + [test])

    def rows(self, demonstrations: Sequence[IclExample], fields: Sequence[dict]) -> list[list[int]]:
        return self.tokens([self.text(demonstrations, item) for item in fields])

    def tokens(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def answer_tokens(self, answer: str) -> list[int]:
        return self.tokens([self.format.answer(answer)])[0]


GENERATION_TASKS = ("squad", "cot")


def generates(task: str, settings: IclConfig) -> bool:
    return task in GENERATION_TASKS or settings.predict != "score"


def scores(task: str, settings: IclConfig) -> bool:
    return task not in GENERATION_TASKS and settings.predict != "generate"


def answer_room(task: str, settings: IclConfig, choices: Sequence[Sequence[int]]) -> int:
    """Tokens a prompt's answer may take after it: the longest verbaliser when scoring, --max-new-tokens when
    generating."""
    scored = max(len(choice) for choice in choices) if scores(task, settings) else 0
    return max(scored, settings.max_new_tokens if generates(task, settings) else 0)


def check_budget(builder: PromptBuilder, settings: IclConfig, pool: Sequence[IclExample], test: Sequence[IclExample],
                 orders: dict[int, list[int]], room: int, context: int, generating: bool) -> None:
    """Every (seed, k) fits the model's context: its longest prompt plus `room` answer tokens. The sets are
    nested, so each seed's largest k is tokenised first and smaller ones only when that one does not fit."""
    fields = [example.fields for example in test]
    for seed, order in orders.items():
        for shots in sorted(settings.shots, reverse=True):
            lengths = [len(row) for row in builder.rows([pool[i] for i in order[:shots]], fields)]
            longest = max(range(len(lengths)), key=lengths.__getitem__)
            over = lengths[longest] + room - context
            if over <= 0:
                break
            fitting = max((k for k in range(shots) if len(builder.rows([pool[i] for i in order[:k]],
                                                                       [fields[longest]])[0]) + room <= context),
                          default=None)
            most = f"at most {fitting} demonstrations fit that example" if fitting is not None else "not even 0 fit"
            raise PeftlabError(
                f"--shots {shots} does not fit the model's context of {context} tokens: with demonstration seed {seed} "
                f"the prompt of {test[longest].origin} takes {lengths[longest]} tokens and its answer up to {room} "
                f"more, {over} tokens too many ({most}). Fix: leave {shots} out of --shots"
                + (" or lower --max-new-tokens" if generating else ""))


def parse_label(text: str, verbalizers: Sequence[str]) -> int:
    """The label whose verbaliser's words begin the generated text's words (case and punctuation ignored; the
    longest matching verbaliser wins), else UNPARSABLE."""
    words = re.findall(r"\w+", text.lower())
    matches = [(len(wanted), label) for label, verbalizer in enumerate(verbalizers)
               if (wanted := re.findall(r"\w+", verbalizer.lower())) and words[: len(wanted)] == wanted]
    return max(matches)[1] if matches else UNPARSABLE


def metrics_of(predictions: Sequence[int], labels: Sequence[int], label_names: Sequence[str]) -> dict:
    metrics = classification_metrics(predictions, labels, label_names)
    return metrics | {"unparsable": sum(int(p == UNPARSABLE) for p in predictions)}


@dataclass(frozen=True)
class SetResult:
    metrics: dict[str, dict]  # scoring mode (raw, norm, calibrated, generate) -> metrics
    records: list[dict]  # one per test example
    prefix_tokens: int  # tokens computed once for the whole set
    prior: list[float] | None  # p_cf


def evaluate_set(model, builder: PromptBuilder, task: str, settings: IclConfig, test: Sequence[IclExample],
                 demonstrations: Sequence[IclExample], label_names: Sequence[str]) -> SetResult:
    """Score every test example after one demonstration set (computed once; the content-free inputs too)."""
    tokenizer = builder.tokenizer
    extra = [{"text": text} for text in CONTENT_FREE] if scores(task, settings) else []
    rows = SharedRows(model, builder.rows(demonstrations, [e.fields for e in test] + extra), tokenizer.pad_token_id)
    records = [{"origin": example.origin} for example in test]
    metrics, prior = {}, None
    if extra:
        prior = score_labels(model, builder, rows, settings, test, label_names, metrics, records)
    if generates(task, settings):
        texts = greedy_texts(model, builder, rows, len(test), settings.max_new_tokens, settings.batch_size)
        for record, text in zip(records, texts):
            record["generated"] = text
        if builder.trigger:
            texts = answer_step(model, builder, test, texts, settings.batch_size)
            for record, text in zip(records, texts):
                record["answer_step"] = text
        judge = {"cot": judge_answers, "squad": judge_spans}.get(task, judge_labels)
        metrics["generate"] = judge(texts, test, records, builder.format.verbalizers, label_names)
    return SetResult(metrics, records, rows.shared, prior)


def score_labels(model, builder: PromptBuilder, rows: SharedRows, settings: IclConfig, test: Sequence[IclExample],
                 label_names: Sequence[str], metrics: dict, records: list[dict]) -> list[float]:
    """Raw, length-normalised and calibrated predictions from the verbalisers' log-likelihoods (the rows after
    the test examples are the content-free inputs) into `metrics` and `records`; returns p_cf."""
    verbalizers, pad_id = builder.format.verbalizers, builder.tokenizer.pad_token_id
    choices = [builder.answer_tokens(verbalizer) for verbalizer in verbalizers]
    loglikelihoods = choice_loglikelihoods(model, rows, choices, pad_id, settings.batch_size)
    prior = content_free_prior(loglikelihoods[len(test) :])
    predicted = label_predictions(loglikelihoods[: len(test)], [len(v) for v in verbalizers], prior)
    labels = [example.label for example in test]
    metrics |= {mode: metrics_of(values, labels, label_names) for mode, values in predicted.items()}
    for index, record in enumerate(records):
        record |= {"label": labels[index], "loglikelihoods": loglikelihoods[index].tolist()}
        record |= {mode: values[index] for mode, values in predicted.items()}
    return prior.tolist()


def greedy_texts(model, builder: PromptBuilder, rows: SharedRows, count: int, max_new_tokens: int,
                 batch_size: int) -> list[str]:
    """The first `count` rows' greedy continuations up to the end of their line, as text."""
    tokenizer = builder.tokenizer
    continuations = greedy_continuations(model, rows, count, max_new_tokens, line_stop_ids(tokenizer),
                                         tokenizer.pad_token_id, batch_size)
    return [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in continuations]


def answer_step(model, builder: PromptBuilder, test: Sequence[IclExample], reasoning: Sequence[str],
                batch_size: int) -> list[str]:
    """Zero-shot chain of thought's second step (Kojima et al. 2022): the prompt, its generated reasoning and the
    answer marker, continued greedily; returns the marker and its continuation."""
    prompts = [f"{builder.text([], example.fields)} {text} {ANSWER_MARKER}" for example, text in zip(test, reasoning)]
    rows = SharedRows(model, builder.tokens(prompts), builder.tokenizer.pad_token_id)
    answers = greedy_texts(model, builder, rows, len(test), ANSWER_STEP_TOKENS, batch_size)
    return [f"{ANSWER_MARKER} {answer}" for answer in answers]


def judge_labels(texts: Sequence[str], test: Sequence[IclExample], records: list[dict], verbalizers: Sequence[str],
                 label_names: Sequence[str]) -> dict:
    """Classification by generation: the label a text names (unparsable counts as wrong)."""
    generated = [parse_label(text, verbalizers) for text in texts]
    for record, label in zip(records, generated):
        record["generate"] = label
    return metrics_of(generated, [example.label for example in test], label_names)


def judge_spans(texts: Sequence[str], test: Sequence[IclExample], records: list[dict], *_) -> dict:
    """SQuAD: exact match and F1 in percent, best over the reference answers (SQuAD v1.1, as the qa workload)."""
    for record, example, text in zip(records, test, texts):
        record |= {"exact_match": 100 * exact_match(text, example.references),
                   "f1": 100 * f1_score(text, example.references)}
    return {name: statistics.fmean(record[name] for record in records) for name in ("exact_match", "f1")}


def judge_answers(texts: Sequence[str], test: Sequence[IclExample], records: list[dict], *_) -> dict:
    """Chain of thought: the answer after the marker, compared normalised (no marker: unparsable, wrong)."""
    answers = [extracted_answer(text) for text in texts]
    for record, example, answer in zip(records, test, answers):
        record |= {"answer": answer, "reference": example.references[0],
                   "correct": same_answer(answer, example.references[0])}
    return {"accuracy": statistics.fmean(float(record["correct"]) for record in records),
            "unparsable": sum(answer is None for answer in answers)}
