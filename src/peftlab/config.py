"""Run configuration: typed dataclasses that are both the YAML schema of `config.yaml` and the CLI's options.

`RunConfig.from_dict` / `load_config` reject unknown keys and wrong types with the offending key named, so a
typo in a YAML file is an error instead of a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from peftlab.errors import PeftlabError
from peftlab.fileio import read_text, write_text_atomic


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  # known model name or local Hugging Face directory
    init: str = "pretrained"  # pretrained | random


@dataclass
class AdapterConfig:
    method: str = "lora"  # lora | full | bitfit | head (rank 0 with lora means full fine-tuning)
    targets: list[str] = field(default_factory=lambda: ["q", "v"])  # roles (q,k,v,o,mlp,all-linear), names or regex
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # on the LoRA branch only
    extra_trainable: list[str] = field(default_factory=list)  # head, biases, norms; [] = the head of a classifier


@dataclass
class TaskConfig:
    name: str = "cola"
    data_dir: str | None = None  # else $PEFTLAB_DATA
    max_length: int = 0  # tokens per example (0 = the task's: 128, squad 384); longer is an error, except squad
    train_limit: int = 0  # use only N evenly spaced training examples (0 = all); for quick experiments
    objective: str = ""  # classification | instruct; "" = the task's own (see `peftlab templates`)
    template: str = ""  # instruct prompt: a template name or a format string with {text}; "" = the task's default
    verbalizers: list[str] = field(default_factory=list)  # instruct: the answer text per label; [] = label names
    loss_on: str = "answer"  # instruct: learn the answer tokens only, or all tokens
    predict: str = "generate"  # instruct: generate | score | both (both: also the agreement)
    eval_limit: int = 0  # evaluate on N evenly spaced validation examples only (0 = all); for quick experiments


@dataclass
class TrainConfig:
    epochs: int = 3
    lr: float = 5e-4
    batch_size: int = 32  # examples per optimizer step (split over processes and accumulation steps)
    grad_accum: int = 1  # micro-batches per optimizer step
    eval_batch_size: int = 64
    warmup_ratio: float = 0.06
    schedule: str = "linear"  # linear | cosine | constant (after warm-up)
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # 0 = no clipping
    seed: int = 0
    eval_every: int = 0  # also evaluate every N optimizer steps (0 = once per epoch)
    select_metric: str = ""  # validation metric that picks checkpoints/best ("" = the task's; loss = lowest)
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class DistillConfig:
    """Knowledge distillation into a small student (W2); `peftlab distill` fills it from a teacher run."""

    teacher: str = ""  # the teacher's run directory (a classification run); "" = not a distillation run
    teacher_checkpoint: str = "best"  # best | last
    student: str = "lstm"  # rnn | gru | lstm
    layers: int = 1
    hidden_size: int = 256  # per direction
    embedding_size: int = 128
    bidirectional: bool = True
    dropout: float = 0.2
    alpha: float = 0.5  # weight of the distillation term; 0 = the student learns from the labels only (no KD)
    temperature: float = 2.0
    augment: int = 0  # Tang et al. 2019 transfer set: augmented copies per training sentence, labelled by the teacher
    mask_probability: float = 0.1  # augmentation: chance of masking each word
    ngram_probability: float = 0.25  # augmentation: chance of keeping only a random n-gram (n = 1..5) of a copy
    augment_seed: int = 0  # the transfer set is fixed across student seeds, so its teacher logits are computed once
    transfer_file: str = ""  # unlabelled sentences, one per line, labelled by the teacher (`peftlab transfer-set`)
    edit_probability: float = 0.0  # augmentation: chance of one word-order edit per copy (swap, delete or move a word)
    embedding_init: str = "random"  # random | teacher (PCA of the teacher's token embeddings)


@dataclass
class RunConfig:
    output_dir: str = "runs/run"
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        return _build(cls, values, "config")


def _build(cls, values, where: str):
    if not isinstance(values, dict):
        raise PeftlabError(f"{where}: expected a mapping, found {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {item.name for item in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise PeftlabError(f"{where}: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}")
    built = {}
    for key, value in values.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            built[key] = _build(hint, value, f"{where}.{key}")
        else:
            built[key] = _check_type(value, hint, f"{where}.{key}")
    return cls(**built)


def _check_type(value, hint, where: str):
    if value is None and type(None) in typing.get_args(hint):
        return None
    base = typing.get_origin(hint)
    if base is list:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise PeftlabError(f"{where}: expected a list of strings, found {value!r}")
        return value
    expected = next(item for item in (typing.get_args(hint) or (hint,)) if item is not type(None))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise PeftlabError(f"{where}: expected {expected.__name__}, found {value!r}")
    return value


def load_config(path: str | os.PathLike) -> RunConfig:
    try:
        values = yaml.safe_load(read_text(Path(path), "config"))
    except yaml.YAMLError as error:
        raise PeftlabError(f"{path}: not valid YAML: {error}") from None
    return _build(RunConfig, values or {}, str(path))


def save_config(config: RunConfig, path: str | os.PathLike) -> None:
    write_text_atomic(Path(path), yaml.safe_dump(config.to_dict(), sort_keys=False))
