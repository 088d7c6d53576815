"""Generative question answering on SQuAD v1.1 (W4): `Context: …\\nQuestion: …\\nAnswer: <answer><EOS>`.

The causal-LM objective, label masking and generation are the shared ones of `tasks/completion.py`.
What is QA-specific:
- training examples longer than --max-length keep a window of the context *around the answer* (centred on
  it) so the answer still fits; an example whose answer cannot fit is skipped and counted;
- evaluation examples never use the gold answer to choose the window: a context that is too long keeps its
  beginning, and the questions whose answer was cut off that way are counted (and mostly answered wrong);
- prediction: greedy generation until EOS or a newline; metrics: Exact Match and F1 with the official SQuAD
  v1.1 normalisation, the maximum over the reference answers, in percent;
- shared contexts (`--share-prefix`, on by default): `Context: <context>` is each example's shared prefix, so
  the questions on one paragraph are batched together and their context is computed once, in training (one
  packed row, block attention mask) and in evaluation (one prefix cache); results equal the unshared ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, partial
from typing import Sequence

from torch import nn

from peftlab.data.datasets import get_dataset
from peftlab.data.squad import read_squad
from peftlab.errors import PeftlabError
from peftlab.tasks import Encoded, StepOutput
from peftlab.generation import decode
from peftlab.shared_prefix import block_mask_unsupported
from peftlab.tasks.completion import Completion, CompletionTarget, CompletionTask, line_stop_ids
from peftlab.tasks.metrics import exact_match, f1_score
from peftlab.workloads.base import Workload

PROMPT_PREFIX = "Context:"
PROMPT_SUFFIX = "\nQuestion: {question}\nAnswer:"


@dataclass(frozen=True)
class QAReference:
    answers: tuple[str, ...]
    id: str
    answer_cut: bool = False  # evaluation: the kept context window lost the (first) gold answer


class QATask(CompletionTask):
    select_metric_default = "f1"
    metric_names = ("exact_match", "f1")
    test_split = None  # the validation articles are the held-out ones

    def __init__(self, tokenizer, data_dir, max_length: int, loss_on: str = "answer", max_new_tokens: int = 32,
                 share_prefix: bool = True):
        super().__init__("squad", tokenizer, max_length, loss_on)
        self.data_dir, self.max_new_tokens = data_dir, max_new_tokens
        self.shares_prefixes = share_prefix and loss_on == "answer"  # a learned context would be learned once only
        self.prefix = self.tokens(PROMPT_PREFIX)  # the same for every example

    def completions(self, split: str) -> list[Completion]:
        return [Completion("", " " + example.answers[0], (split, example), example.origin)
                for example in read_squad(split, self.data_dir)]

    def encode_one(self, completion: Completion) -> Encoded | None:
        split, example = completion.reference
        prefix, suffix = self.prefix, self.tokens(PROMPT_SUFFIX.format(question=example.question))
        answer = self.tokens(completion.completion) + [self.tokenizer.eos_token_id]
        encoding = self.tokenizer(" " + example.context, add_special_tokens=False, return_offsets_mapping=True)
        context, offsets = encoding["input_ids"], encoding["offset_mapping"]
        budget = self.max_length - len(prefix) - len(suffix) - len(answer)
        start, end = _answer_span(offsets, 1 + example.answer_starts[0], 1 + example.answer_starts[0] + len(example.answers[0]))
        cut = False
        if len(context) > budget:
            if split == "train":
                if end - start > budget:
                    return None  # the answer alone does not fit: skipped, counted in `skipped`
                first = min(max(0, start - (budget - (end - start)) // 2), len(context) - budget)
            else:
                first = 0  # evaluation never looks at the answer to place the window
                cut = end > budget
            context = context[first : first + budget] if budget > 0 else []
        if not context and split == "train":
            return None
        prompt = prefix + context + suffix
        reference = QAReference(example.answers, example.id, cut)
        return Encoded(prompt + answer, CompletionTarget(len(prompt), reference), completion.origin,
                       shared_length=len(prefix) + len(context))

    @cached_property
    def stop_ids(self) -> set[int]:
        """An answer is one line: EOS and the newline tokens stop it."""
        return line_stop_ids(self.tokenizer)

    def forward(self, model, batch: dict) -> StepOutput:
        """Training: the loss. Evaluating shared contexts: the loss pass also holds every question's context and
        prompt in its key/value cache, so the answers are generated from there (each context computed once)."""
        if model.training or "continue_rows" not in batch:
            return super().forward(model, batch)
        return self.generate_after_loss(model, batch, batch, partial(self.generate, model))

    def predict(self, model, examples: Sequence[Encoded]) -> list[str]:
        return self.generate(model, *self.prompt_inputs(model, examples))

    def generate(self, model, prompts: list[list[int]], prefix) -> list[str]:
        """Greedy answers to `prompts` (after `prefix`)."""
        return self.answers(decode(model, prompts, self.max_new_tokens, self.stop_ids, self.tokenizer.pad_token_id,
                                   prefix=prefix))

    def answers(self, generated: list[list[int]]) -> list[str]:
        """The generated tokens as answers: the first line, stripped."""
        return [self.tokenizer.decode(tokens, skip_special_tokens=True).split("\n")[0].strip() for tokens in generated]

    def metrics(self, predictions: list[str], examples: Sequence[Encoded]) -> dict:
        scores = [self.example_metrics(p, e) for p, e in zip(predictions, examples)]
        return {
            "exact_match": sum(score["exact_match"] for score in scores) / len(examples),
            "f1": sum(score["f1"] for score in scores) / len(examples),
            "empty_answers": sum(int(not prediction) for prediction in predictions),
            "answer_cut": sum(int(example.target.reference.answer_cut) for example in examples),
        }

    def example_metrics(self, prediction: str, example: Encoded) -> dict:
        """One question's EM and F1 in percent (the dataset's are their means)."""
        answers = example.target.reference.answers
        return {"exact_match": 100 * exact_match(prediction, answers), "f1": 100 * f1_score(prediction, answers)}

    def format_metrics(self, metrics: dict) -> str:
        return (f"EM: {metrics['exact_match']:.2f}, F1: {metrics['f1']:.2f}, empty answers: {metrics['empty_answers']}, "
                f"answer cut from a long context: {metrics['answer_cut']}")


def _answer_span(offsets, start_char: int, end_char: int) -> tuple[int, int]:
    """[first, last + 1) token indices overlapping the characters [start_char, end_char)."""
    tokens = [index for index, (start, end) in enumerate(offsets) if end > start_char and start < end_char]
    if not tokens:
        raise PeftlabError(f"no token covers the answer characters {start_char}:{end_char}")
    return tokens[0], tokens[-1] + 1


class QAWorkload(Workload):
    """Generative extractive QA: the model writes the answer after the context and question (SQuAD, W4)."""

    name = "qa"

    def task_for(self, config, tokenizer) -> QATask:
        settings = config.task
        return QATask(tokenizer, settings.data_dir, settings.max_length or get_dataset(settings.name).max_length,
                      settings.loss_on, share_prefix=settings.share_prefix)

    def build_model(self, config, task: QATask, device, fresh: bool, context) -> nn.Module:
        model = super().build_model(config, task, device, fresh, context)
        unsupported = block_mask_unsupported(model) if task.shares_prefixes else None
        if unsupported:
            print(f"Note: contexts are not shared: {unsupported}")
            task.shares_prefixes = False
        return model

    input_fields = ("context", "question")

    def input_from_text(self, text: str, origin: str) -> dict[str, str]:
        """One text is the context, then the question on its last line."""
        context, _, question = text.rpartition("\n")
        if not context.strip() or not question.strip():
            missing = "question" if context.strip() else "context"
            raise PeftlabError(f"{origin}: a qa input given as one text is the context, a new line, then the question "
                               "(e.g. --text 'Anna painted the door red.\\nWhat colour is the door?'); this one has no "
                               f"{missing}. Fix: add it, or give a JSONL file with context and question")
        return {"context": context.strip(), "question": question.strip()}

    def encode_input(self, task: QATask, fields, origin) -> Encoded:
        """The evaluation prompt: a context too long for the run's max length keeps its beginning, as in
        evaluation, and the record says so (`context_cut`)."""
        prefix, suffix = task.prefix, task.tokens(PROMPT_SUFFIX.format(question=fields["question"]))
        context = task.tokens(" " + fields["context"])
        budget = task.max_length - len(prefix) - len(suffix)
        if budget < 1:
            raise PeftlabError(f"{origin}: the question alone is {len(suffix)} tokens with the prompt, which leaves no "
                               f"room for the context in the run's max length {task.max_length}. Fix: shorten it")
        prompt = prefix + context[:budget] + suffix
        return Encoded(prompt, CompletionTarget(len(prompt), QAReference((), "", len(context) > budget)), origin,
                       shared_length=len(prefix) + len(context[:budget]))

    def predict_examples(self, task: QATask, model, examples) -> list[dict]:
        return [{"prediction": answer, "context_cut": example.target.reference.answer_cut}
                for answer, example in zip(task.predict(model, examples), examples)]

    def prompt_text(self, task: QATask, fields) -> str:
        return f"{PROMPT_PREFIX} {fields['context']}{PROMPT_SUFFIX.format(question=fields['question'])}"

    def split_inputs(self, task: QATask, split: str) -> dict[str, dict[str, str]]:
        return {example.origin: {"context": example.context, "question": example.question}
                for example in read_squad(split, task.data_dir)}
