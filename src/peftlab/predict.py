"""Predicting with a trained run on inputs of one's own: `peftlab.load_run(RUN_DIR).predict(inputs)` and
`peftlab predict`. The run's workload turns each input into the example its model reads and each batch of
predictions into records (`Workload.encode_input`, `Workload.predict_examples`), with the run's own template,
verbalisers, max length and prediction mode; this module reads inputs, batches them and shows progress. It names
no workload.

An input is a text (`Workload.input_from_text`: for a qa run, the context then the question on the last line) or a
dict holding the workload's `input_fields` (a classifier's and an instruct run's "text"; a qa run's "context" and
"question"); other keys are kept in the record's "input" and not read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from peftlab.errors import PeftlabError
from peftlab.fileio import read_text
from peftlab.runs import RunDir
from peftlab.tasks import Encoded
from peftlab.weights import pack_for_decoding
from peftlab.workloads.loading import load_run as load_run_model
from peftlab.workloads.loading import workload_for

Input = str | dict


class LoadedRun:
    """A run's checkpoint loaded for prediction: `predict` turns inputs into records (see the module's docstring)."""

    def __init__(self, path: str, checkpoint: str, device: str | None = None, weights: str = "fp32"):
        config = RunDir(path).read_config()
        if device:
            config.train.device = device
        self.path, self.checkpoint = path, checkpoint
        self.config, self.task, self.model = load_run_model(path, checkpoint, config)
        self.model.eval()
        pack_for_decoding(self.model, weights)
        self.workload = workload_for(self.config)

    @property
    def input_fields(self) -> tuple[str, ...]:
        """What one input holds (the JSONL fields `peftlab predict --input` reads)."""
        return self.workload.input_fields

    def predict(self, inputs: Input | Sequence[Input], batch_size: int | None = None, progress: bool = False,
                origins: Sequence[str] | None = None) -> list[dict]:
        """One record per input, in order: {"input": the input as given, "prediction": a label name or the
        generated answer, ...}; a classifier's (and an instruct run's) records add "label" (its index),
        "label_names" and "probabilities" (in label order).

        Args:
            inputs: one input or a list of them (texts, or dicts with `input_fields`).
            batch_size: inputs per forward pass (default: the run's evaluation batch size).
            progress: a progress bar on standard error.
            origins: where each input comes from, for error messages (default: "input 1", "input 2", ...).
        """
        items = [inputs] if isinstance(inputs, (str, dict)) else list(inputs)
        origins = list(origins) if origins is not None else [f"input {number}" for number in range(1, len(items) + 1)]
        examples = [self.encode(item, origin) for item, origin in zip(items, origins)]
        records = in_batches(lambda batch: self.workload.predict_examples(self.task, self.model, batch), examples,
                             batch_size or self.config.train.eval_batch_size, "predict" if progress else None)
        return [{"input": item} | record for item, record in zip(items, records)]

    def encode(self, item: Input, origin: str) -> Encoded:
        """The example the run's model reads for one input; a missing field is an error naming `origin`."""
        if isinstance(item, str):
            fields = self.workload.input_from_text(item, origin)
        elif isinstance(item, dict):
            missing = [name for name in self.input_fields if not isinstance(item.get(name), str)]
            if missing:
                raise PeftlabError(f"{origin}: no text field '{missing[0]}'; a {self.task.name} run reads "
                                   f"{', '.join(self.input_fields)}. Fix: add it to the input")
            fields = {name: item[name] for name in self.input_fields}
        else:
            raise PeftlabError(f"{origin}: an input is a text or an object with {', '.join(self.input_fields)}, "
                               f"not {type(item).__name__}")
        return self.workload.encode_input(self.task, fields, origin)


def load_run(path: str | Path, checkpoint: str = "best", device: str | None = None,
             weights: str = "fp32") -> LoadedRun:
    """A trained run ready to predict: `load_run("runs/rt").predict(["A gripping film."])`.

    `checkpoint`: "best" or "last"; `device`: instead of the run's config.yaml's (e.g. "cpu"); `weights`: fp16 or
    int8 packs the frozen linear layers for a CPU (`peftlab.weights`)."""
    return LoadedRun(str(path), checkpoint, device, weights)


def in_batches(predict: Callable[[list[Encoded]], list[dict]], examples: list[Encoded], batch_size: int,
               progress: str | None = None) -> list[dict]:
    """`predict` over consecutive batches of `examples`, in inference mode; `progress`: the progress bar's label
    (on standard error), or None for none."""
    if batch_size < 1:
        raise PeftlabError(f"--batch-size must be >= 1, got {batch_size}")
    records = []
    with torch.inference_mode(), tqdm(total=len(examples), desc=progress, unit="input", leave=False,
                                      dynamic_ncols=True, mininterval=2.0, disable=progress is None) as bar:
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            records += predict(batch)
            bar.update(len(batch))
    return records


def read_inputs(path: str | Path) -> tuple[list[Input], list[str]]:
    """(inputs, origins "file:line") of an input file: JSON lines (a .jsonl file: one object per line) or text (any
    other name: one input per line); blank lines are skipped. Which fields an object needs is checked with the run
    (`LoadedRun.encode`)."""
    path = Path(path)
    text = read_text(path, "input file")
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise PeftlabError(f"input file {path} has no input: write one per line")
    if path.suffix != ".jsonl":
        return [line for _, line in lines], [f"{path}:{number}" for number, _ in lines]
    inputs = []
    for number, line in lines:
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise PeftlabError(f"{path}:{number}: not a JSON object ({error.msg}, column {error.colno}). Fix: one JSON "
                               "object per line, or a file not named .jsonl for plain text lines") from None
        if not isinstance(value, dict):
            raise PeftlabError(f"{path}:{number}: a JSON line must be an object (e.g. {{\"text\": ...}}), not "
                               f"{type(value).__name__}")
        inputs.append(value)
    return inputs, [f"{path}:{number}" for number, _ in lines]
