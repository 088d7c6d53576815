"""In-context prompt formats: each task's named formats with their verbalisers, a user's own format string checked,
and how an example, a demonstration and the content-free inputs are written. Light (no torch), so a bad format is
an error before any model loads.

A prompt is lm-evaluation-harness's: the demonstrations, each `format(input) + delimiter + answer`, joined by a
blank line, then a blank line and `format(test input)`; the answer follows after the target delimiter " " (none
when the format ends in whitespace, or in a chat turn).
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path

from peftlab.errors import PeftlabError
from peftlab.fileio import read_text
from peftlab.settings import expand_escapes

DEMONSTRATION_SEPARATOR = "\n\n"
TARGET_DELIMITER = " "
CONTENT_FREE = ("N/A", "[MASK]", "")  # Zhao et al. 2021's content-free inputs, averaged into p_cf
CLASSIFICATION_FIELDS = ("sentence", "input")  # a user's classification format names its input one of these ways
QA_FIELDS = ("context", "question")
COT_FIELDS = ("input", "rationale", "answer")  # a chain-of-thought demonstrations file's fields
ANSWER_MARKER = "The answer is"  # chain of thought: the answer is what follows it
ZERO_SHOT_TRIGGER = "Let's think step by step."  # Kojima et al. 2022


@dataclass(frozen=True)
class NamedFormat:
    text: str
    verbalizers: tuple[str, ...] = ()  # classification: the answer per label; empty for squad


# task -> format name -> format; the first is the task's default. "lm-eval" is lm-evaluation-harness's own (its
# cola and sst2 tasks; squad: its squadv2 prompt without the title).
FORMATS: dict[str, dict[str, NamedFormat]] = {
    "cola": {
        "lm-eval": NamedFormat("{sentence}\nQuestion: Does this sentence make sense?\nAnswer:", ("no", "yes")),
        "acceptable": NamedFormat("Sentence: {sentence}\nIs this sentence grammatically acceptable?\nAnswer:",
                                  ("no", "yes")),
    },
    "rotten_tomatoes": {
        "lm-eval": NamedFormat("{sentence}\nQuestion: Is this sentence positive or negative?\nAnswer:",
                               ("negative", "positive")),
        "review": NamedFormat("Review: {sentence}\nSentiment:", ("negative", "positive")),
    },
    "squad": {
        "lm-eval": NamedFormat("Background: {context}\n\nQuestion: {question}\n\n Answer:"),
        "context": NamedFormat("Context: {context}\nQuestion: {question}\nAnswer:"),
    },
    "cot": {
        "qa": NamedFormat("Q: {input}\nA:"),
    },
}


@dataclass(frozen=True)
class PromptFormat:
    """A resolved format: its text, the field that takes a classification input, the verbalisers (classification)
    and the delimiter put between a prompt and its answer."""

    text: str
    input_field: str  # "sentence" or "input"; "" for squad
    verbalizers: tuple[str, ...]
    delimiter: str

    def prompt(self, fields: dict[str, str]) -> str:
        """The format filled with one example: {"text": ...} for classification, context and question for squad."""
        if self.input_field:
            return self.text.format(**{self.input_field: fields["text"]})
        return self.text.format(context=fields["context"], question=fields["question"])

    def answer(self, text: str) -> str:
        """What follows a prompt in a demonstration (and what is scored): the delimiter, then the answer."""
        return self.delimiter + text


def format_fields(text: str) -> set[str]:
    try:
        return {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}
    except ValueError as error:
        raise PeftlabError(f"--format {text!r} is not a valid format string: {error} (write literal braces as "
                           "{{ }})") from None


def resolve_format(task: str, name: str | None, verbalizers: list[str] | None, labels: int, chat: bool) -> PromptFormat:
    """A named format of `task` (None: its first) or a user's format string (\\n = newline), with its verbalisers:
    the ones given, else the named format's (a user's format for a classification task needs --verbalizers)."""
    named = FORMATS[task]
    name = name or next(iter(named))
    if name in named:
        text, default_verbalizers = named[name].text, named[name].verbalizers
    else:
        text, default_verbalizers = expand_escapes(name), ()
    expected = QA_FIELDS if task == "squad" else CLASSIFICATION_FIELDS
    fields = format_fields(text)
    if task == "squad" and fields != set(QA_FIELDS):
        raise PeftlabError(f"--format {name!r} is neither a format name of squad ({', '.join(named)}) nor a format "
                           "string with exactly the fields {context} and {question}")
    if task != "squad" and (len(fields) != 1 or not fields <= set(expected)):
        raise PeftlabError(f"--format {name!r} is neither a format name of {task} ({', '.join(named)}) nor a format "
                           "string whose one field is the input, {sentence} or {input} (write literal braces as {{ }})")
    chosen = tuple(verbalizers or default_verbalizers)
    if labels and len(chosen) != labels:
        given = f"{len(chosen)} given" if chosen else "a user's format has none of its own"
        raise PeftlabError(f"{task} has {labels} labels, so --verbalizers needs {labels} comma-separated answers in "
                           f"label order ({given})")
    if any(not verbalizer.strip() for verbalizer in chosen) or len(set(chosen)) != len(chosen):
        raise PeftlabError(f"--verbalizers {','.join(chosen)!r}: every label needs its own non-empty answer")
    delimiter = "" if chat or text[-1:].isspace() else TARGET_DELIMITER
    input_field = "" if task == "squad" else next(iter(fields))
    return PromptFormat(text, input_field, chosen, delimiter)


def format_names() -> str:
    """The named formats, for --help."""
    return "; ".join(f"{task}: {', '.join(names)}" for task, names in FORMATS.items())


# ----------------------------------------------------------------------------------------------------------
# Chain of thought


@dataclass(frozen=True)
class Problem:
    input: str
    rationale: str
    answer: str
    origin: str  # file:line


def read_problems(path: str) -> list[Problem]:
    """A chain-of-thought file: one JSON object a line with string fields input, rationale and answer (blank lines
    skipped); anything else is an error naming file:line."""
    problems = []
    for number, line in enumerate(read_text(Path(path), "--demonstrations file").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except ValueError as error:
            raise PeftlabError(f"{where}: not a JSON object ({error})") from None
        if not isinstance(record, dict):
            raise PeftlabError(f"{where}: expected a JSON object with {', '.join(COT_FIELDS)}")
        missing = [field for field in COT_FIELDS if not isinstance(record.get(field), str) or not record[field].strip()]
        if missing:
            raise PeftlabError(f"{where}: missing or empty {', '.join(missing)} (each line needs the strings "
                               f"{', '.join(COT_FIELDS)})")
        problems.append(Problem(record["input"].strip(), record["rationale"].strip(), record["answer"].strip(), where))
    if not problems:
        raise PeftlabError(f"{path}: no problems")
    return problems


def demonstration_answer(problem: Problem, reasoning: str) -> str:
    """What a demonstration answers: its rationale and the marked answer, or the marked answer alone."""
    marked = f"{ANSWER_MARKER} {problem.answer}."
    return f"{problem.rationale} {marked}" if reasoning == "rationale" else marked


def extracted_answer(text: str) -> str | None:
    """What follows the last answer marker, up to the end of its sentence; None without a marker."""
    _, marker, rest = text.rpartition(ANSWER_MARKER)
    if not marker:
        return None
    return re.split(r"\.(?:\s|$)|\n", rest.strip(), maxsplit=1)[0].strip(" :")


def same_answer(predicted: str | None, reference: str) -> bool:
    """Equal after normalisation: numbers by value ('$1,200.00' is 1200), other text by lower-cased words."""
    if predicted is None:
        return False
    numbers = [re.sub(r"[$,]", "", text) for text in (predicted, reference)]
    try:
        return float(re.findall(r"-?\d+(?:\.\d+)?", numbers[0])[0]) == float(numbers[1])
    except (IndexError, ValueError):
        return re.findall(r"\w+", predicted.lower()) == re.findall(r"\w+", reference.lower())
