"""The distillation workload: a DistilRNN student on the teacher run's task (see `peftlab.workloads.distill`)."""

from __future__ import annotations

from peftlab.models import load_tokenizer
from peftlab.tasks import Encoded
from peftlab.workloads.base import (Context, Workload, classifier_details, classifier_records,
                                     tokens_within)
from peftlab.workloads.distill.students import build_student
from peftlab.workloads.distill.task import DistillationTask, DistillTarget, init_student_embedding


class DistillWorkload(Workload):
    """A student trained on a teacher run's classification task, with the teacher's logits as soft targets."""

    name = "distill"
    not_exportable = "a distilled student (DistilRNN), not a Hugging Face model"

    def build_task(self, config, context: Context) -> DistillationTask:
        teacher_task = context.task_for(config, load_tokenizer(config.model.name))  # the teacher's own task
        return DistillationTask(teacher_task, config, context.load_run)

    def build_model(self, config, task, device, fresh, context: Context):
        student = build_student(config.distill, task.vocabulary, task.num_labels)
        if fresh and config.distill.embedding_init == "teacher":
            init_student_embedding(student, config.distill, task.vocabulary, context.load_run)
        return student.to(device)

    def encode_input(self, task: DistillationTask, fields, origin) -> Encoded:
        """The teacher tokenizer's ids of the text (the run's max length) in the student's vocabulary (a token the
        training sentences never had is the student's unknown id, as in evaluation)."""
        ids = tokens_within(task.base.tokenizer, fields["text"], task.base.max_length, origin)
        return Encoded(task.vocabulary.encode(ids), DistillTarget(-1, None), origin)

    def predict_examples(self, task: DistillationTask, model, examples) -> list[dict]:
        return classifier_records(task, model, examples, task.base.label_names)

    def prediction_details(self, task: DistillationTask, model, examples) -> list[dict]:
        return classifier_details(task, model, examples, task.base.label_names)

    def split_inputs(self, task: DistillationTask, split: str) -> dict[str, str]:
        return {example.origin: example.text for example in task.base.read_split(split)}
