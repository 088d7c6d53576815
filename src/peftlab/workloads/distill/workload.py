"""The distillation workload: a DistilRNN student on the teacher run's task (see `peftlab.workloads.distill`)."""

from __future__ import annotations

from peftlab.models import load_tokenizer
from peftlab.workloads.base import Context, Workload
from peftlab.workloads.distill.students import build_student
from peftlab.workloads.distill.task import DistillationTask, init_student_embedding


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
