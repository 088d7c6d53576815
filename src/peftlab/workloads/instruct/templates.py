"""Instruct prompts: each task's named templates and verbalizers, and a user's own template checked. Light (no
torch), so `peftlab templates` lists them at once."""

from __future__ import annotations

import string

from peftlab.errors import PeftlabError
from peftlab.settings import expand_escapes

_CHAT = "<|im_start|>user\n{question}\n{{text}}<|im_end|>\n<|im_start|>assistant\n"

# task -> template name -> format string with {text}; the first is the task's default.
TEMPLATES: dict[str, dict[str, str]] = {
    "rotten_tomatoes": {
        "review": "Review: {text}\nSentiment:",
        "question": "Is the sentiment of this movie review positive or negative?\nReview: {text}\nAnswer:",
        "chat": _CHAT.format(question="Is this movie review positive or negative? Answer with one word."),
    },
    "cola": {
        "sentence": "Sentence: {text}\nIs this sentence grammatically acceptable?\nAnswer:",
        "chat": _CHAT.format(question="Is this English sentence grammatically acceptable? Answer yes or no."),
    },
}
DEFAULT_VERBALIZERS = {"cola": ("no", "yes")}  # otherwise the label names


def resolve_template(task: str, template: str) -> str:
    """A template name of `task`, or a user's format string whose only field is {text} (escapes: `expand_escapes`)."""
    named = TEMPLATES.get(task, {})
    if not template:
        if not named:
            raise PeftlabError(f"task '{task}' has no default template: pass --template 'TEXT {{text}} TEXT'")
        return next(iter(named.values()))
    if template in named:
        return named[template]
    text = expand_escapes(template)
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}
    except ValueError as error:
        raise PeftlabError(f"template {template!r} is not a valid format string: {error}") from None
    if fields != {"text"}:
        names = ", ".join(named) or "none"
        raise PeftlabError(
            f"template {template!r} is neither a template name of {task} ({names}) nor a format string whose only "
            "field is {text} (write literal braces as {{ }})"
        )
    return text


