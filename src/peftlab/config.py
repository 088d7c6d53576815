"""Run configuration: a run's typed sections (model, adapter, task, train, and its workload's own section) are the
YAML schema of `config.yaml` and, through their field metadata (`peftlab.settings.setting`), the command line's
options (generated in `peftlab.options`).

A workload's section is declared by the workload (`peftlab.workloads.registry.WorkloadSpec.settings`) and lives in
`RunConfig.sections`; `config.instruct` reads it (None when the run has none). None means "the task's own" for a few
fields; the run's workload resolves them when the run starts (`Workload.resolve`), so a run's config.yaml records
the values it actually used. Files written before that used "", 0 or [] for the same fields; loading maps those
to None (the fields' `legacy_unset`). `RunConfig.from_dict` / `load_config` reject unknown keys and wrong types
with the offending key named, so a typo in a YAML file is an error instead of a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from peftlab.errors import PeftlabError
from peftlab.fileio import read_text, write_text_atomic
from peftlab.settings import resolved_when_run_starts, setting
from peftlab.workloads.registry import registered_workloads, section_types


@dataclass
class ModelConfig:
    name: str = setting("smollm2-135m", "known model name (see `peftlab models`) or a local Hugging Face directory",
                        option="model", evaluation="zero-shot")
    init: str = setting("pretrained", "pretrained | random (the architecture with random weights)",
                        evaluation="zero-shot")
    dropout: float | None = setting(None, "dropout inside the model while training (GPT-2: embedding, attention and "
                                    "residual dropout; Llama-family models such as SmolLM2 have attention dropout "
                                    "only); the LoRA branch's own is --lora-dropout", option="model-dropout",
                                    default_text="the model's own: GPT-2 0.1, SmolLM2 0")


@dataclass
class AdapterConfig:
    method: str = setting("lora", "lora | dora | ia3 | adapter | prefix | full | bitfit | head "
                          "(rank 0 with lora is full fine-tuning)")
    targets: list[str] = setting(["q", "v"], "comma-separated roles (q,k,v,o,mlp,all-linear), module names or regexes")
    rank: int = setting(8, "LoRA rank; 0 = full fine-tuning")
    alpha: float = setting(16.0, "LoRA alpha; scaling = alpha/rank")
    dropout: float = setting(0.0, "dropout on the LoRA branch", option="lora-dropout")
    extra_trainable: list[str] | None = setting(None, "also train: comma-separated head,biases,norms",
                                                default_text="the head of a classifier, else nothing",
                                                legacy_unset=[])
    adapter_size: int = setting(64, "method adapter: the bottleneck size m")
    adapter_placement: str = setting("houlsby", "method adapter: houlsby (after attention and after the MLP of every "
                                     "block) | pfeiffer (after the MLP only)")
    adapter_nonlinearity: str = setting("relu", "method adapter: relu | gelu | tanh | silu")
    prefix_length: int = setting(10, "method prefix: the number of prefix positions p")
    prefix_projection: int | None = setting(None, "method prefix: train the prefix through an MLP of this width",
                                            default_text="plain prefixes")


@dataclass
class TaskConfig:
    name: str = setting("cola", "task to train on: cola, rotten_tomatoes, squad", option="task", evaluation="zero-shot")
    data_dir: str | None = setting(None, "data directory", default_text="$PEFTLAB_DATA",
                                   legacy_unset="")  # a DPO run resolves it to its --preferences
    max_length: int | None = setting(None, "tokens per example at most; longer is an error, except squad contexts, "
                                     "which are cut", default_text="the task's: 128, squad 384",
                                     legacy_unset=0, evaluation="zero-shot")
    train_limit: int = setting(0, "use only N evenly spaced training examples; 0 = all")
    objective: str | None = setting(None, "classification (a head on the last token) | instruct (generated labels) | "
                                    "qa (squad) | lm (plain text) | dpo (preference pairs)",
                                    default_text="the task's own, see `peftlab templates`",
                                    legacy_unset="", evaluation="zero-shot")
    loss_on: str = setting("answer", "instruct, qa: learn the answer tokens only, or all tokens: answer | all")
    eval_limit: int = setting(0, "evaluate on N evenly spaced validation examples; 0 = all")
    test_limit: int = setting(0, "the end-of-training test on N evenly spaced test examples; 0 = all")
    share_prefix: bool = setting(True, "squad: compute each paragraph's context once for all its questions (packed "
                                 "rows with a block attention mask in training, one prefix cache in evaluation; "
                                 "needs --loss-on answer); --no-share-prefix: every question on its own")


@dataclass
class TrainConfig:
    epochs: int = setting(3, "epochs")
    lr: float = setting(5e-4, "peak learning rate")
    batch_size: int = setting(32, "examples per optimizer step (split over processes and accumulation steps)")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    eval_batch_size: int = setting(64, "evaluation batch size")
    warmup_ratio: float = setting(0.06, "share of steps for linear warm-up")
    schedule: str = setting("linear", "linear | cosine | constant decay after warm-up")
    weight_decay: float = setting(0.01, "AdamW weight decay on matrices")
    max_grad_norm: float = setting(1.0, "gradient clipping norm; 0 = off")
    seed: int = setting(0, "random seed")
    eval_every: int = setting(0, "also evaluate every N optimizer steps; 0 = once per epoch only")
    save_every: int = setting(0, "also write a resumable checkpoints/last every N optimizer steps (mid-epoch); "
                              "0 = at the end of each epoch only")
    max_steps: int = setting(0, "stop after N optimizer steps in all (the schedule ends there too); 0 = the epochs "
                             "decide")
    select_metric: str | None = setting(None, "validation metric choosing checkpoints/best; loss = lowest",
                                        default_text="the task's: mcc, accuracy or f1",
                                        legacy_unset="")
    device: str = setting("auto", "auto | cpu | cuda[:N] (auto = cuda if available)")
    precision: str = setting("auto", "auto | fp32 | bf16 | fp16: bf16/fp16 autocast with fp32 weights (auto = bf16 "
                             "on a GPU that supports it, else fp32; fp16 needs a GPU)")
    merge_for_evaluation: bool = setting(False, "evaluate with LoRA/DoRA/IA3 merged into the base weights (merged for "
                                         "each evaluation, un-merged after): faster for all-linear LoRA and DoRA; a "
                                         "fp32 un-merge may move a weight by an ulp", evaluation="any")
    report_to: list[str] = setting([], "trackers for per-step and evaluation metrics: tensorboard,wandb (W&B runs "
                                   "offline when no API key is set); files under <run>/trackers")
    init_from: str | None = setting(None, "start from a finished run's adapter weights (RUN_DIR): more epochs, "
                                    "another task or objective; its adapter settings and model must be this run's",
                                    default_text="the method's own initialisation")
    init_checkpoint: str = setting("best", "with --init-from: that run's checkpoint to start from: best | last")


CONFIG_VERSION = 2  # 2: None for "the task's own" (resolved when the run starts); 1 (no version key): "", 0, []
CORE_SECTIONS = ("model", "adapter", "task", "train")


@dataclass
class RunConfig:
    output_dir: str = "runs/run"
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # The run's workload's own section (name -> its settings dataclass); a run has at most its workload's.
    sections: dict[str, object] = field(default_factory=dict)
    version: int = CONFIG_VERSION
    # Where and how the run was started (versions, command line, device, precision); written by the run, not a
    # setting: `same_run` ignores it.
    environment: dict | None = None

    def __getattr__(self, name: str):
        """`config.instruct`: a registered workload's section, or None when this run has none."""
        if name in section_types():
            return self.__dict__.get("sections", {}).get(name)
        raise AttributeError(f"{type(self).__name__} has no attribute or workload section '{name}'")

    def __setattr__(self, name: str, value) -> None:
        if name in section_types():
            self.sections.pop(name, None) if value is None else self.sections.__setitem__(name, value)
        else:
            super().__setattr__(name, value)

    def to_dict(self) -> dict:
        values = {"output_dir": self.output_dir}
        values |= {name: dataclasses.asdict(getattr(self, name)) for name in CORE_SECTIONS}
        values |= {name: dataclasses.asdict(section) for name, section in self.sections.items()}
        values["version"] = self.version
        return values | ({"environment": self.environment} if self.environment is not None else {})

    @classmethod
    def from_dict(cls, values: dict, where: str = "config") -> "RunConfig":
        return _build_run_config(_upgrade(values), where)


def all_sections() -> dict[str, type]:
    """Every section config.yaml may have: the core ones, then the registered workloads'."""
    hints = typing.get_type_hints(RunConfig)
    return {name: hints[name] for name in CORE_SECTIONS} | section_types()


def resolved_later() -> list[tuple[str, str, object]]:
    """(section, key, version-1 unset value) of the settings whose None a run resolves when it starts."""
    return [(name, item.name, item.metadata["legacy_unset"]) for name, cls in all_sections().items()
            for item in dataclasses.fields(cls) if resolved_when_run_starts(item)]


def same_run(recorded: RunConfig, config: RunConfig) -> bool:
    """Whether `config` describes the run `recorded` (a config.yaml) is: equal everywhere, a None of `config`
    matching whatever the run resolved it to; where the run lives (output_dir) does not count."""
    mine, theirs = config.to_dict(), recorded.to_dict()
    for name, cls in section_types().items():  # a workload adds its section, with its defaults, when the run starts
        if name in theirs and name not in mine:
            mine[name] = dataclasses.asdict(cls())
    for section, key, _ in resolved_later():
        if section in mine and section in theirs and mine[section][key] is None:
            mine[section][key] = theirs[section][key]
    mine["output_dir"] = theirs["output_dir"]
    mine.pop("environment", None), theirs.pop("environment", None)
    return mine == theirs


def _upgrade(values):
    """A version-1 mapping (no `version` key: old run directories, hand-written YAML) in today's terms: each
    workload moves its own settings (`WorkloadSpec.upgrade_v1`), then "", 0 and [] that meant "the task's own"
    become None."""
    if not isinstance(values, dict) or "version" in values:
        return values
    values = {key: dict(value) if isinstance(value, dict) else value for key, value in values.items()}
    for spec in registered_workloads():
        if spec.upgrade_v1 is not None:
            spec.upgrade_v1(values)
    for section, key, unset in resolved_later():
        if isinstance(values.get(section), dict) and values[section].get(key, None) == unset:
            values[section][key] = None
    return values | {"version": CONFIG_VERSION}


def _build_run_config(values, where: str) -> RunConfig:
    """A RunConfig from a mapping whose top level holds the core sections and at most workload sections."""
    if not isinstance(values, dict):
        raise PeftlabError(f"{where}: expected a mapping, found {type(values).__name__}")
    workload_sections = section_types()
    known = set(values) & set(workload_sections)
    sections = {name: _build(workload_sections[name], values[name], f"{where}.{name}")
                for name in values if name in known and values[name] is not None}
    config = _build(RunConfig, {key: value for key, value in values.items() if key not in known}, where,
                    extra_known=workload_sections)
    config.sections = sections
    return config


def _build(cls, values, where: str, extra_known=()):
    if not isinstance(values, dict):
        raise PeftlabError(f"{where}: expected a mapping, found {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {item.name for item in dataclasses.fields(cls) if item.name != "sections"}
    known |= set(extra_known)
    unknown = sorted(set(values) - known)
    if unknown:
        raise PeftlabError(f"{where}: unknown key(s) {', '.join(unknown)}{did_you_mean(unknown[0], known)}; expected "
                           f"some of {', '.join(sorted(known))}")
    built = {}
    for key, value in values.items():
        hint = section_type(hints[key])
        if dataclasses.is_dataclass(hint):
            built[key] = None if value is None else _build(hint, value, f"{where}.{key}")
        else:
            built[key] = _check_type(value, hint, f"{where}.{key}")
    return cls(**built)


def _check_type(value, hint, where: str):
    options = [item for item in (typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType)
                                 else (hint,)) if item is not type(None)]
    if value is None:
        if len(options) < len(typing.get_args(hint) or (hint,)):  # Optional
            return None
        raise PeftlabError(f"{where}: expected {_type_name(options[0])}, found nothing (null)")
    expected = options[0]
    if typing.get_origin(expected) is list:
        item_type = (typing.get_args(expected) or (str,))[0]
        if isinstance(value, str):  # "q,v" (a --set value, or a YAML scalar) is the list q, v; "0,4" the list 0, 4
            value = [_from_text(item.strip(), item_type) for item in value.split(",") if item.strip()]
        if not isinstance(value, list):
            raise PeftlabError(f"{where}: expected {_type_name(expected)}, found {value!r}")
        return [_check_type(item, item_type, f"{where}[{index}]") for index, item in enumerate(value)]
    if expected is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise PeftlabError(f"{where}: expected {_type_name(expected)}, found {value!r}")
    return value


def closest(name: str, choices) -> str | None:
    """The one of `choices` closest to a misspelled `name`, if any is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(name: str, choices) -> str:
    """' (did you mean X?)' for the closest of `choices`, or nothing."""
    match = closest(name, choices)
    return f" (did you mean {match}?)" if match else ""


def set_dotted(values: dict, key: str, value, where: str) -> None:
    """values[section][key] = value for a dotted SECTION.KEY (the names of config.yaml)."""
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        raise PeftlabError(f"{where}: '{key}' must be SECTION.KEY, e.g. adapter.rank or train.lr")
    section = values.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise PeftlabError(f"{where}: '{parts[0]}' is not a section (SECTION.KEY, e.g. adapter.rank or train.lr)")
    section[parts[1]] = value


def split_assignment(option: str, expected: str) -> tuple[str, str]:
    """A --set option's key and raw value: 'train.lr=3e-4' -> ('train.lr', '3e-4')."""
    key, separator, value = option.partition("=")
    if not separator or not key.strip() or not value:
        raise PeftlabError(f"--set {option!r}: expected {expected}")
    return key.strip(), value


def yaml_scalar(text: str):
    """A value as YAML reads it (16 is a number, true a bool), else the text itself."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_assignment(option: str) -> tuple[str, object]:
    """'train.lr=3e-4' -> ('train.lr', '3e-4'): one value of `peftlab train --set`, read as a YAML scalar."""
    key, value = split_assignment(option, "SECTION.KEY=VALUE (e.g. train.lr=3e-4)")
    return key, yaml_scalar(value)


def section_type(hint):
    """A section's dataclass, also when the section is optional (`ModelConfig | None`)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        classes = [item for item in typing.get_args(hint) if dataclasses.is_dataclass(item)]
        return classes[0] if classes else hint
    return hint


def _type_name(hint) -> str:
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name((typing.get_args(hint) or (str,))[0])}s"
    return hint.__name__


def _from_text(text: str, item_type):
    """One item of a comma-separated list as its type (an integer list's "4" is 4); left as text when it is not one,
    so the type check names it."""
    if item_type is int:
        try:
            return int(text)
        except ValueError:
            return text
    return text


def load_config(path: str | os.PathLike) -> RunConfig:
    try:
        values = yaml.safe_load(read_text(Path(path), "config"))
    except yaml.YAMLError as error:
        raise PeftlabError(f"{path}: not valid YAML: {error}") from None
    return _build_run_config(_upgrade(values or {}), str(path))


def save_config(config: RunConfig, path: str | os.PathLike) -> None:
    write_text_atomic(Path(path), yaml.safe_dump(config.to_dict(), sort_keys=False))
