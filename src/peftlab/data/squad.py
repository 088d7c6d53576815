"""SQuAD v1.1 question answering, in the official JSON structure.

    {"data": [{"title": ..., "paragraphs": [{"context": ..., "qas": [{"id": ..., "question": ...,
              "answers": [{"text": ..., "answer_start": <character offset into context>}]}]}]}], "version": "1.1"}

Splits: this project's files `dev-split-train.json` / `dev-split-validation.json` (the official dev set split
by article, see the data README), or else the official `train-v1.1.json` / `dev-v1.1.json`. Every answer is
checked (`context[answer_start:answer_start + len(text)] == text`); bad ones are an error naming article and
question id.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from peftlab.data import require_file, resolve_data_dir
from peftlab.errors import PeftlabError
from peftlab.fileio import read_json

SPLIT_FILES = {"train": ("dev-split-train.json", "train-v1.1.json"),
               "validation": ("dev-split-validation.json", "dev-v1.1.json")}


@dataclass(frozen=True)
class QAExample:
    id: str
    title: str
    context: str
    question: str
    answers: tuple[str, ...]  # every reference answer (dev questions have 1-6); EM/F1 take the best
    answer_starts: tuple[int, ...]  # character offsets into context
    origin: str  # file + question id


def present_splits(data_dir: str | os.PathLike | None = None) -> list[str]:
    """The splits with one of their files in the data directory."""
    folder = resolve_data_dir(data_dir, "squad")
    return [split for split, names in SPLIT_FILES.items() if any((folder / name).is_file() for name in names)]


def split_path(split: str, data_dir: str | os.PathLike | None):
    if split not in SPLIT_FILES:
        raise PeftlabError(f"unknown SQuAD split '{split}': expected one of {', '.join(SPLIT_FILES)}")
    folder = resolve_data_dir(data_dir, "squad")
    for name in SPLIT_FILES[split]:
        if (folder / name).is_file():
            return folder / name
    return require_file(folder / SPLIT_FILES[split][0], f"SQuAD {split} split ({' or '.join(SPLIT_FILES[split])})")


def read_squad(split: str, data_dir: str | os.PathLike | None = None) -> list[QAExample]:
    """Every question of a split, in file order; malformed structure or a misplaced answer is an error."""
    path = split_path(split, data_dir)
    document = read_json(path, f"SQuAD {split} file")
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise PeftlabError(f"{path}: expected SQuAD v1.1 JSON, an object with a 'data' list of articles")
    examples, bad = [], []
    for article_index, article in enumerate(document["data"]):
        title = article.get("title", f"article {article_index}") if isinstance(article, dict) else f"article {article_index}"
        try:
            examples += _article_examples(article, title, path.name, bad)
        except (KeyError, TypeError, AttributeError) as error:
            raise PeftlabError(f"{path}: article '{title}': a paragraph, question or answer lacks a field or has the "
                               f"wrong type ({type(error).__name__}: {error})") from None
    if bad:
        shown = "\n  ".join(bad[:10])
        raise PeftlabError(f"{path}: {len(bad)} bad answer(s):\n  {shown}" + ("\n  ..." if len(bad) > 10 else ""))
    if not examples:
        raise PeftlabError(f"{path}: no questions")
    return examples


def _article_examples(article: dict, title: str, file_name: str, bad: list[str]) -> list[QAExample]:
    examples = []
    for paragraph in article["paragraphs"]:
        context = paragraph["context"]
        for qa in paragraph["qas"]:
            where = f"article '{title}', question {qa['id']}"
            answers = qa["answers"]
            if not answers:
                bad.append(f"{where}: no answer")
                continue
            for answer in answers:
                start, text = answer["answer_start"], answer["text"]
                if context[start : start + len(text)] != text:
                    bad.append(f"{where}: context[{start}:{start + len(text)}] is "
                               f"{context[start:start + len(text)]!r}, not the answer {text!r}")
            examples.append(QAExample(qa["id"], title, context, qa["question"], tuple(a["text"] for a in answers),
                                      tuple(a["answer_start"] for a in answers), f"{file_name} {qa['id']}"))
    return examples
