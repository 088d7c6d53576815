"""Instruction tuning with generated labels (W3): `template(text) + verbalized label + EOS`, causal-LM loss.

Prediction (`predict`):
- generate: greedy generation of a few tokens (KV cache; in evaluation continued from the loss pass's cache, so the
  prompts are computed once); the text is mapped to a label when, lower-cased and
  stripped of leading spaces/punctuation, it starts with exactly one verbalizer as a whole word (the longest
  wins when one verbalizer is a prefix of another). Anything else is *unparsable*: a wrong prediction, counted
  and reported, never dropped.
- score: the log-likelihood of each verbalizer after the prompt (one forward pass), highest wins; exact.
- both: both, with their agreement. The reported `accuracy` is the generated one whenever generation ran.

The answer follows the template directly when the template ends in whitespace, else after one space.
"""

from __future__ import annotations

import string
from functools import partial
from collections import Counter
from typing import Callable, Sequence

from peftlab.data import LabelledText
from peftlab.errors import PeftlabError
from peftlab.generation import decode
from peftlab.shared_prefix import single_row_continuations
from peftlab.tasks import Encoded, StepOutput
from peftlab.tasks.completion import Completion, CompletionTarget, CompletionTask, score_choices
from peftlab.tasks.metrics import classification_metrics
from peftlab.workloads.base import Workload, label_record
from peftlab.workloads.instruct import PREDICT_MODES, InstructConfig
from peftlab.workloads.instruct.templates import DEFAULT_VERBALIZERS, resolve_template

UNPARSABLE = -1
def parse_label(text: str, verbalizers: Sequence[str]) -> int:
    """The label whose verbalizer the generated text starts with (as a whole word), else UNPARSABLE."""
    cleaned = text.lower().lstrip(string.whitespace + string.punctuation)
    best, best_length = UNPARSABLE, 0
    for label, verbalizer in enumerate(verbalizers):
        word = verbalizer.lower().strip()
        if cleaned.startswith(word) and len(word) > best_length:
            rest = cleaned[len(word) :]
            if not rest or not (rest[0].isalnum() or rest[0] == "_"):
                best, best_length = label, len(word)
    return best


class InstructTask(CompletionTask):
    select_metric_default = "accuracy"

    def __init__(
        self,
        name: str,
        label_names: Sequence[str],
        read_split: Callable[[str], list[LabelledText]],
        tokenizer,
        max_length: int,
        loss_on: str = "answer",
        template: str = "",
        verbalizers: Sequence[str] = (),
        predict: str = "generate",
    ):
        super().__init__(name, tokenizer, max_length, loss_on)
        if predict not in PREDICT_MODES:
            raise PeftlabError(f"--predict must be one of {', '.join(PREDICT_MODES)}, got '{predict}'")
        self.label_names = tuple(label_names)
        self.read_split = read_split
        self.template = resolve_template(name, template)
        self.verbalizers = tuple(verbalizers or ()) or DEFAULT_VERBALIZERS.get(name, self.label_names)
        if len(self.verbalizers) != len(self.label_names):
            raise PeftlabError(
                f"{len(self.verbalizers)} verbalizers ({', '.join(self.verbalizers)}) for {len(self.label_names)} "
                f"labels ({', '.join(self.label_names)}): give one per label, in that order"
            )
        if len({v.lower().strip() for v in self.verbalizers}) != len(self.verbalizers) or not all(v.strip() for v in self.verbalizers):
            raise PeftlabError(f"verbalizers must be distinct and non-empty, got {list(self.verbalizers)}")
        self.predict_mode = predict
        separator = "" if self.template[-1:].isspace() else " "
        self.answers = [separator + verbalizer for verbalizer in self.verbalizers]
        self.answer_tokens = [self.tokens(answer) for answer in self.answers]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def completions(self, split: str) -> list[Completion]:
        return [Completion(self.template.format(text=example.text), self.answers[example.label], example.label, example.origin)
                for example in self.read_split(split)]

    def forward(self, model, batch: dict) -> StepOutput:
        """Training: the loss. Evaluating by generation alone (answer-only loss): the loss pass also holds every
        prompt in its key/value cache, so the labels are generated from there instead of computing the prompts
        again (`shared_prefix.continuation_cache`)."""
        if model.training or self.predict_mode != "generate" or self.loss_on != "answer":
            return super().forward(model, batch)
        continuations = batch if "continue_rows" in batch else single_row_continuations(batch)
        if continuations is None:
            return super().forward(model, batch)
        return self.generate_after_loss(model, batch, continuations, partial(self.generate, model))

    def generate(self, model, prompts: list[list[int]], prefix, pick_next=None) -> list[dict]:
        """Greedy labels for `prompts` (after `prefix`): {"generate": label or -1, "text": generated text} each."""
        longest = max(len(tokens) for tokens in self.answer_tokens)
        eos = self.tokenizer.eos_token_id
        generated = decode(model, prompts, longest + 1, {eos}, self.tokenizer.pad_token_id, pick_next, prefix=prefix)
        texts = [self.tokenizer.decode([token for token in tokens if token != eos]) for tokens in generated]
        return [{"generate": parse_label(text, self.verbalizers), "text": text} for text in texts]

    def predict(self, model, examples: Sequence[Encoded]) -> list[dict]:
        """Per example {"generate": label or -1, "text": generated text} and/or {"score": label}."""
        prompts, prefix = self.prompt_inputs(model, examples)  # after a shared prefix (demonstrations), if any
        results = [{} for _ in examples]
        scores = None
        if self.predict_mode in ("generate", "both"):
            first_step_logits = []  # the prompts' next-token distribution

            def greedy(logits):
                if not first_step_logits:
                    first_step_logits.append(logits)
                return logits.argmax(-1)

            for result, generated in zip(results, self.generate(model, prompts, prefix, greedy)):
                result.update(generated)
            if self.predict_mode == "both" and all(len(tokens) == 1 for tokens in self.answer_tokens):
                # Single-token answers: scoring needs exactly that distribution, so no second pass over the prompts.
                scores = first_step_logits[0].float().log_softmax(-1)[:, [tokens[0] for tokens in self.answer_tokens]]
        if self.predict_mode in ("score", "both"):
            if scores is None:
                scores = score_choices(model, prompts, self.answer_tokens, self.tokenizer.pad_token_id, prefix=prefix)
            for result, label in zip(results, scores.argmax(-1).tolist()):
                result["score"] = label
        return results

    @property
    def metric_names(self) -> tuple[str, ...]:
        return ("accuracy", "mcc") + (("score_accuracy", "agreement") if self.predict_mode == "both" else ())

    def metrics(self, predictions: list[dict], examples: Sequence[Encoded]) -> dict:
        labels = [example.target.reference for example in examples]
        primary = "generate" if "generate" in predictions[0] else "score"
        chosen = [prediction[primary] for prediction in predictions]
        metrics = classification_metrics(chosen, labels, self.label_names)
        metrics["unparsable"] = Counter(chosen)[UNPARSABLE]
        if primary == "generate" and "score" in predictions[0]:
            scored = [prediction["score"] for prediction in predictions]
            metrics["score_accuracy"] = sum(int(p == y) for p, y in zip(scored, labels)) / len(labels)
            metrics["agreement"] = sum(int(p["generate"] == p["score"]) for p in predictions) / len(predictions)
        return metrics

    def format_metrics(self, metrics: dict) -> str:
        counts = ", ".join(f"{name}: {count}" for name, count in metrics["predicted_counts"].items())
        text = (f"Accuracy: {metrics['accuracy']:.4f}, MCC: {metrics['mcc']:.4f}, predicted [{counts}], "
                f"unparsable: {metrics['unparsable']}")
        if "agreement" in metrics:
            text += f", score accuracy: {metrics['score_accuracy']:.4f}, agreement: {metrics['agreement']:.4f}"
        return text


class InstructWorkload(Workload):
    """Instruction tuning of a language model: a prompt template, the label's verbaliser as the answer (W3)."""

    name = "instruct"

    def resolve(self, config, task: InstructTask) -> None:
        super().resolve(config, task)
        config.instruct.template, config.instruct.verbalizers = task.template, list(task.verbalizers)

    def task_for(self, config, tokenizer) -> InstructTask:
        instruct = config.instruct or InstructConfig()
        return self.labelled_task(InstructTask, config, tokenizer, config.task.loss_on, instruct.template,
                                  instruct.verbalizers, instruct.predict)

    def encode_input(self, task: InstructTask, fields, origin) -> Encoded:
        """The run's prompt for the text; it must leave room for the longest answer and EOS within the run's max
        length, as a training example must."""
        prompt = task.tokens(self.prompt_text(task, fields))
        longest = len(prompt) + max(len(tokens) for tokens in task.answer_tokens) + 1
        if longest > task.max_length:
            raise PeftlabError(f"{origin}: {longest} tokens with the prompt template and the longest answer, more than "
                               f"the run's max length {task.max_length}. Fix: shorten the input (nothing is cut "
                               "silently)")
        return Encoded(prompt, CompletionTarget(len(prompt), None), origin)

    def predict_examples(self, task: InstructTask, model, examples) -> list[dict]:
        """The run's prediction mode decides the label (the generated one when generation runs, as in evaluation);
        the generated text comes with it."""
        records = []
        for result, details in zip(task.predict(model, examples), self.prediction_details(task, model, examples)):
            record = label_record(result["generate" if "generate" in result else "score"], details)
            records.append(record | ({"generated": result["text"]} if "text" in result else {}))
        return records

    def prediction_details(self, task: InstructTask, model, examples) -> list[dict]:
        """Label names and probabilities: each verbaliser's likelihood after the prompt, normalised over the labels."""
        prompts, prefix = task.prompt_inputs(model, examples)
        scores = score_choices(model, prompts, task.answer_tokens, task.tokenizer.pad_token_id, prefix=prefix)
        return [{"label_names": list(task.label_names), "probabilities": row} for row in scores.softmax(-1).tolist()]

    def prompt_text(self, task: InstructTask, fields) -> str:
        return task.template.format(text=fields["text"])
