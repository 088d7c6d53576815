"""Knowledge distillation into a small RNN student (W2): the `distill` settings section and the workload's spec
with its commands, `distill` and `transfer-set`. The rest is imported when needed: the workload (`workload`), its
task and loss (`task`), the student (`students`), the transfer-set sampler (`transfer`) and the command line
(`command_line`, light). The commands themselves orchestrate runs, so they live above the run service, in
`peftlab.commands.distill`.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.settings import setting
from peftlab.workloads.registry import Command, WorkloadSpec


@dataclass
class DistillConfig:
    """Knowledge distillation into a small student (W2); `peftlab distill` fills it from a teacher run."""

    teacher: str = setting("", "the teacher: a classification run of `peftlab train`; empty = not a distillation")
    teacher_checkpoint: str = setting("best", "the teacher's checkpoint: best | last")
    student: str = setting("lstm", "rnn | gru | lstm")
    layers: int = setting(1, "stacked RNN layers")
    hidden_size: int = setting(256, "RNN state size per direction")
    embedding_size: int = setting(128, "token embedding size")
    bidirectional: bool = setting(True, "read both directions")
    dropout: float = setting(0.2, "dropout on embeddings, between layers, before the classifier")
    alpha: float = setting(0.5, "weight of the distillation term; 0 = no distillation")
    temperature: float = setting(2.0, "softmax temperature T of the distillation term")
    augment: int = setting(0, "Tang et al. 2019 transfer set: N augmented copies per training sentence (word masking, "
                           "n-gram sampling; seeded), labelled by the teacher")
    mask_probability: float = setting(0.1, "augmentation: chance of masking a word")
    ngram_probability: float = setting(0.25, "augmentation: chance of keeping an n-gram only")
    augment_seed: int = setting(0, "augmentation seed; fixed across student seeds, so the teacher labels the "
                                "transfer set once")
    transfer_file: str = setting("", "transfer set: a file of unlabelled sentences, one per line, labelled by the "
                                 "teacher (see `peftlab transfer-set`); empty = none")
    edit_probability: float = setting(0.0, "augmentation: chance of one word-order edit per copy (swap neighbours, "
                                      "delete or move a word)")
    embedding_init: str = setting("random", "student embedding: random | teacher (PCA of the teacher's token "
                                  "embeddings to --embedding-size)")


DISTILL_TRAIN_DEFAULTS = {"epochs": 10, "lr": 2e-3}  # a student's own defaults (`peftlab distill`)


def upgrade_v1(values: dict) -> None:
    """Before version 2 every run carried an idle distill section (empty teacher); only a distillation has one now."""
    if isinstance(values.get("distill"), dict) and not values["distill"].get("teacher"):
        del values["distill"]


SPEC = WorkloadSpec(
    name="distill",
    workload="peftlab.workloads.distill.workload:DistillWorkload",
    settings=DistillConfig,
    chosen_by="section",
    train_options=False,
    upgrade_v1=upgrade_v1,
    commands=(
        Command("distill", "distil a fine-tuned classifier run into a small RNN student (W2)",
                arguments="peftlab.workloads.distill.command_line:distill_arguments",
                run="peftlab.commands.distill:run_distill",
                description="Train a DistilRNN student (embedding -> RNN/GRU/LSTM -> linear) on the teacher run's task "
                "with loss alpha*T^2*KL(teacher/T || student/T) + (1-alpha)*CE; --alpha 0 is the student without "
                "distillation. The run directory is an ordinary run: `peftlab eval` it, resume it with `peftlab train "
                "--resume RUN_DIR`.", writes_runs=True),
        Command("transfer-set", "sample unlabelled sentences for distillation with the teacher's base model (W2)",
                arguments="peftlab.workloads.distill.command_line:transfer_set_arguments",
                run="peftlab.commands.distill:run_transfer_set",
                description="Write a transfer set for `peftlab distill --transfer-file`: the teacher run's base "
                "language model (without its adapter) continues the first words of a training sentence after a few "
                "other training sentences; lines that end a sentence and are neither duplicates nor training "
                "sentences are kept."),
    ),
)
