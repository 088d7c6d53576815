"""Knowledge distillation of a fine-tuned classifier (the teacher run) into a small RNN student (W2).

A distillation run is an ordinary run of the one training engine whose config has a `distill` section:
* the task is `DistillationTask`, wrapping the teacher's classification task: the same sentences and tokenizer,
  with token ids renumbered into the student's own small vocabulary, and each training example carrying its
  teacher logits; a transfer set of unlabelled sentences (augmented copies, `augment`, or a file, `transfer_file`,
  see `transfer`) joins the training sentences with the teacher's predictions as labels;
* the model is `students.DistilRNN` (built by `DistillWorkload.build_model`);
* the training loss is alpha · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − alpha) · CE(student, y),
  averaged over examples (batchmean), in fp32.
So checkpoints, resume, plots, metrics.jsonl, summary.json, `peftlab eval` and `load_run` work as for any run.

Validation and test splits are scored against the gold labels (cross-entropy): a student is evaluated without
its teacher, and val_loss compares KD and no-KD students. train_loss is the objective above.

Teacher logits are computed once per (teacher checkpoint, data, split, inputs) and cached in the student's run
directory: teacher_logits/<split>.safetensors, which holds the fingerprint they were computed for (`peftlab.cache`).
A <split>.json beside it was written by an older peftlab: such a cache is recomputed once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from peftlab.cache import cached_tensors, file_digest
from peftlab.config import RunConfig, load_config
from peftlab.data import evenly_spaced
from peftlab.data.datasets import objective_of
from peftlab.errors import PeftlabError
from peftlab.fileio import read_text, write_text_atomic
from peftlab.tasks import Encoded, StepOutput, Task, right_pad
from peftlab.tasks.metrics import classification_metrics
from peftlab.workloads.base import RunLoader
from peftlab.workloads.distill import DISTILL_TRAIN_DEFAULTS, DistillConfig
from peftlab.workloads.distill.students import RNN_KINDS, principal_components

VOCABULARY_FILE = "student_vocabulary.json"
CACHE_DIR = "teacher_logits"
MAX_NGRAM = 5  # Tang et al. 2019 sample n-grams of n = 1..5 words
CHECKPOINTS = ("best", "last")
EMBEDDING_INITS = ("random", "teacher")
TRANSFER_SET_FIELDS = ("augment", "mask_probability", "ngram_probability", "edit_probability", "augment_seed",
                       "transfer_file")  # how the KD student's transfer set is made; a no-KD student has none


# ----------------------------------------------------------------------------------------------------------
# The loss


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      alpha: float, temperature: float) -> torch.Tensor:
    """alpha · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − alpha) · CE(student, labels), batchmean, fp32.

    The KL divergence goes from the teacher's distribution to the student's (the teacher is the target).
    T² keeps the soft term's gradients on the scale of the hard term's whatever T (Hinton et al. 2015).
    """
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)  # (B, C)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)  # (B, C)
    # kl_div(input, target) = sum target · (log target − input): KL(teacher ‖ student), summed, / B.
    soft = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="batchmean")
    hard = F.cross_entropy(student_logits, labels)
    return alpha * temperature**2 * soft + (1 - alpha) * hard


# ----------------------------------------------------------------------------------------------------------
# The student's vocabulary


@dataclass(frozen=True)
class StudentVocabulary:
    """The teacher-tokenizer ids that occur in the training sentences, renumbered from 2; every other id is
    unknown. Keeps the student's embedding at a few thousand rows instead of the tokenizer's ~50k."""

    teacher_ids: tuple[int, ...]  # student id = 2 + position
    padding_id: ClassVar[int] = 0
    unknown_id: ClassVar[int] = 1
    FORMAT: ClassVar[str] = "peftlab-student-vocabulary"

    @classmethod
    def from_examples(cls, examples: Sequence[Encoded]) -> "StudentVocabulary":
        return cls(tuple(sorted({token for example in examples for token in example.input_ids})))

    @property
    def size(self) -> int:
        return len(self.teacher_ids) + 2

    @cached_property
    def _student_ids(self) -> dict[int, int]:
        return {teacher_id: position + 2 for position, teacher_id in enumerate(self.teacher_ids)}

    def encode(self, teacher_ids: Sequence[int]) -> list[int]:
        return [self._student_ids.get(token, self.unknown_id) for token in teacher_ids]

    def save(self, path: Path) -> None:
        values = {"format": self.FORMAT, "padding_id": self.padding_id, "unknown_id": self.unknown_id,
                  "teacher_ids": list(self.teacher_ids)}
        write_text_atomic(path, json.dumps(values) + "\n")

    @classmethod
    def load(cls, path: Path) -> "StudentVocabulary":
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise PeftlabError(f"cannot read the student vocabulary {path}: {error}") from None
        if not isinstance(values, dict) or values.get("format") != cls.FORMAT:
            raise PeftlabError(f"{path}: not a student vocabulary (expected format '{cls.FORMAT}')")
        return cls(tuple(values["teacher_ids"]))


# ----------------------------------------------------------------------------------------------------------
# Augmentation (Tang et al. 2019 transfer set, without the POS-guided replacement that needs a tagger), plus
# word-order edits: CoLA's errors are mostly local, so near-misses of training sentences are the informative part
# of the input space, where the teacher's soft labels carry the most.

EDITS = ("swap", "delete", "move")


def edit_words(words: Sequence[str], generator: random.Random) -> list[str]:
    """One word-order edit, chosen uniformly: swap two neighbouring words, delete a word, or move a word elsewhere.
    A one-word sentence is returned unchanged."""
    words = list(words)
    if len(words) < 2:
        return words
    edit = generator.choice(EDITS)
    if edit == "swap":
        index = generator.randrange(len(words) - 1)
        words[index], words[index + 1] = words[index + 1], words[index]
    elif edit == "delete":
        del words[generator.randrange(len(words))]
    else:
        word = words.pop(generator.randrange(len(words)))
        words.insert(generator.randrange(len(words) + 1), word)
    return words


def augment_sentence(word_pieces: Sequence[Sequence[int]], generator: random.Random, mask_probability: float,
                     ngram_probability: float, mask_id: int) -> list[int]:
    """One augmented copy of a sentence given as the token ids of each of its words.

    Each word becomes the single `mask_id` token with probability `mask_probability`; then, with probability
    `ngram_probability`, only a random n-gram of n = 1..5 words is kept.
    """
    words = [[mask_id] if generator.random() < mask_probability else list(piece) for piece in word_pieces]
    if generator.random() < ngram_probability:
        n = generator.randint(1, min(MAX_NGRAM, len(words)))
        start = generator.randrange(len(words) - n + 1)
        words = words[start : start + n]
    return [token for word in words for token in word]


def augmented_copies(sentences: Sequence[Encoded], texts: Sequence[str], tokenizer, settings: DistillConfig,
                     seed: int) -> list[Encoded]:
    """`settings.augment` copies of every sentence (target: the source sentence's label), seeded by `seed`.

    A copy first gets a word-order edit with probability `settings.edit_probability` (its own random stream, so
    the masks and n-grams of a seed do not depend on it), then masking and n-gram sampling (`augment_sentence`).
    Words are tokenized one by one, with a leading space except the first, so a masked word is exactly one
    token. The teacher has no mask token: its unknown token (else end-of-text) stands in, which the student maps
    to its own unknown id.
    """
    generator, edit_generator = random.Random(seed), random.Random(f"{seed} edits")
    originals = [text.split() for text in texts]
    copies = [[edit_words(words, edit_generator) if edit_generator.random() < settings.edit_probability else words
               for words in originals] for _ in range(settings.augment)]
    keys = sorted({(index == 0, word) for pass_ in copies for words in pass_ for index, word in enumerate(words)})
    ids = tokenizer([word if first else " " + word for first, word in keys], add_special_tokens=False)["input_ids"]
    pieces = dict(zip(keys, ids))
    mask_id = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.eos_token_id
    augmented = []
    for number, pass_ in enumerate(copies, start=1):  # one pass over the sentences per copy
        for sentence, words in zip(sentences, pass_):
            word_pieces = [pieces[index == 0, word] for index, word in enumerate(words)]
            augmented_ids = augment_sentence(word_pieces, generator, settings.mask_probability,
                                             settings.ngram_probability, mask_id)
            augmented.append(Encoded(augmented_ids, sentence.target, f"{sentence.origin} augmented {number}"))
    return augmented


# ----------------------------------------------------------------------------------------------------------
# Teacher logits, computed once and cached


def cache_fingerprint(teacher: Path, checkpoint: str, split: str, examples: Sequence[Encoded]) -> dict:
    """What the teacher's logits depend on: its checkpoint's tensors, the data files (from the examples' origins,
    file:line), the split, and the exact inputs (augmented copies and --train-limit included)."""
    checkpoint_files = sorted((Path(teacher) / "checkpoints" / checkpoint).glob("*.safetensors"))
    data_files = sorted({Path(example.origin.rpartition(":")[0]) for example in examples})
    inputs = json.dumps([example.input_ids for example in examples]).encode()
    return {
        "teacher_checkpoint": {path.name: file_digest(path) for path in checkpoint_files},
        "data_files": {path.name: file_digest(path) for path in data_files},
        "split": split,
        "inputs_sha256": hashlib.sha256(inputs).hexdigest(),
    }


def compute_teacher_logits(teacher: Path, checkpoint: str, examples: Sequence[Encoded], load_run: RunLoader) -> torch.Tensor:
    """The teacher run's logits for teacher-tokenized examples: (N, num_labels), fp32, in the examples' order."""
    config, task, model = load_run(str(teacher), checkpoint)
    model.eval()
    device = next(model.parameters()).device
    batch_size = config.train.eval_batch_size
    order = sorted(range(len(examples)), key=lambda index: examples[index].length)  # batches with little padding
    logits = torch.empty(len(examples), task.num_labels)
    with torch.inference_mode():
        for offset in tqdm(range(0, len(order), batch_size), desc=f"teacher logits ({len(examples)} sentences)",
                           leave=False, dynamic_ncols=True, mininterval=2.0):
            indices = order[offset : offset + batch_size]
            batch = task.collate([examples[index] for index in indices])
            output = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            logits[indices] = output.float().cpu()  # (b, C)
    return logits


def teacher_logits(teacher: Path, checkpoint: str, split: str, examples: Sequence[Encoded], cache_dir: Path,
                   load_run: RunLoader) -> torch.Tensor:
    """The teacher's logits for `examples` (N, num_labels), computed once per fingerprint (`cache_fingerprint`)
    and kept in cache_dir/<split>.safetensors (`peftlab.cache`; a changed input recomputes and replaces it)."""
    read_teacher_config(str(teacher), checkpoint)  # a clear error for a missing or unfit teacher
    fingerprint = cache_fingerprint(teacher, checkpoint, split, examples)

    def compute() -> dict[str, torch.Tensor]:
        return {"teacher_logits": compute_teacher_logits(teacher, checkpoint, examples, load_run)}

    return cached_tensors(cache_dir / f"{split}.safetensors", fingerprint, compute)["teacher_logits"]


# ----------------------------------------------------------------------------------------------------------
# The task


@dataclass(frozen=True)
class DistillTarget:
    label: int  # the gold label; for an augmented copy, the teacher's prediction
    teacher_logits: tuple[float, ...] | None  # None where the loss needs no teacher (evaluation, no-KD training)


def needs_teacher(settings: DistillConfig) -> bool:
    """Whether training needs teacher logits: soft targets (alpha > 0) or a teacher-labelled transfer set."""
    return settings.alpha > 0 or settings.augment > 0 or bool(settings.transfer_file)


class DistillationTask(Task):
    """The teacher's classification task seen by a student: same sentences and labels, student token ids,
    and for training the teacher's logits and the distillation loss."""

    model_task = "classification"
    encoding_is_costly = True  # the teacher labels the training data

    def __init__(self, base: Task, config: RunConfig, load_run: RunLoader):
        """`base`: the teacher's classification task (its sentences, labels, tokenizer); `load_run` loads the
        teacher run for its logits."""
        check_settings(config)
        if base.model_task != "classification":
            raise PeftlabError(f"distillation needs a classification task; {base.name} here is {base.model_task}")
        self.base, self.config, self.load_run = base, config, load_run
        self.name, self.test_split = base.name, base.test_split
        self.select_metric_default, self.metric_names = base.select_metric_default, base.metric_names
        self.run_dir = Path(config.output_dir)
        path = self.run_dir / VOCABULARY_FILE
        self.vocabulary = (StudentVocabulary.load(path) if path.is_file()
                           else StudentVocabulary.from_examples(self._sentences + self._transfer_sentences))
        print(f"Student vocabulary: {self.vocabulary.size - 2:,} of the teacher tokenizer's {len(base.tokenizer):,} "
              "tokens (those of its training sentences, transfer set included) + padding + unknown")

    @property
    def num_labels(self) -> int:
        return self.base.num_labels

    @cached_property
    def _sentences(self) -> list[Encoded]:
        """The training sentences the student learns from (--train-limit applied here, before augmentation)."""
        return evenly_spaced(self.base.encode("train"), self.config.task.train_limit)

    def encode(self, split: str) -> list[Encoded]:
        if split != "train":
            return [self._student_example(example, example.target, None) for example in self.base.encode(split)]
        sentences = self._sentences
        if not (self.run_dir / VOCABULARY_FILE).is_file():
            self.vocabulary.save(self.run_dir / VOCABULARY_FILE)
        settings = self.config.distill
        examples = sentences + self._augmented_copies(sentences) + self._transfer_sentences
        if not needs_teacher(settings):
            return [self._student_example(example, example.target, None) for example in examples]
        teacher_model = read_teacher_config(settings.teacher, settings.teacher_checkpoint).model.name
        if teacher_model != self.config.model.name:
            raise PeftlabError(f"the student's model.name '{self.config.model.name}' must be its teacher's, "
                               f"'{teacher_model}': the student reads the teacher tokenizer's ids")
        logits = teacher_logits(Path(settings.teacher), settings.teacher_checkpoint, "train", examples,
                                self.run_dir / CACHE_DIR, self.load_run)
        # Augmented copies and transfer sentences have no gold label: the teacher's prediction is theirs.
        labels = [example.target for example in sentences] + logits[len(sentences):].argmax(-1).tolist()
        return [self._student_example(example, label, tuple(row))
                for example, label, row in zip(examples, labels, logits.tolist())]

    def _augmented_copies(self, sentences: list[Encoded]) -> list[Encoded]:
        if not self.config.distill.augment:
            return []
        texts = {example.origin: example.text for example in self.base.read_split("train")}
        return augmented_copies(sentences, [texts[example.origin] for example in sentences], self.base.tokenizer,
                                self.config.distill, self.config.distill.augment_seed)

    @cached_property
    def _transfer_sentences(self) -> list[Encoded]:
        """The transfer file's sentences in the teacher tokenizer's ids (target: a placeholder, the teacher labels them)."""
        if not self.config.distill.transfer_file:
            return []
        sentences = read_transfer_file(self.config.distill.transfer_file)
        token_ids = self.base.tokenizer([text for text, _ in sentences], add_special_tokens=False)["input_ids"]
        encoded = []
        for (text, origin), ids in zip(sentences, token_ids):
            if not 0 < len(ids) <= self.base.max_length:
                raise PeftlabError(f"{origin}: {len(ids)} tokens; a transfer sentence needs 1 to --max-length "
                                   f"{self.base.max_length}. Fix: shorten or remove the line")
            encoded.append(Encoded(ids, -1, origin))
        return encoded

    def _student_example(self, example: Encoded, label: int, logits: tuple[float, ...] | None) -> Encoded:
        return Encoded(self.vocabulary.encode(example.input_ids), DistillTarget(label, logits), example.origin)

    def collate(self, examples: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        """Right-pad with the student's padding id; teacher logits when the examples carry them."""
        input_ids, attention_mask = right_pad([example.input_ids for example in examples], self.vocabulary.padding_id)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "labels": torch.tensor([example.target.label for example in examples], dtype=torch.long)}
        if examples[0].target.teacher_logits is not None:
            batch["teacher_logits"] = torch.tensor([example.target.teacher_logits for example in examples])
        return batch

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["labels"])

    def reference(self, example: Encoded) -> int:
        return example.target.label

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # (B, C)
        labels = batch["labels"]
        if "teacher_logits" in batch:
            settings = self.config.distill
            mean = distillation_loss(logits, batch["teacher_logits"], labels, settings.alpha, settings.temperature)
            loss_sum = mean * len(labels)  # the engine divides by the examples of the whole step
        else:
            loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
        predictions = logits.argmax(-1)
        return StepOutput(loss_sum, len(labels), predictions.tolist(), int((predictions == labels).sum()))

    def metrics(self, predictions: list, examples: Sequence[Encoded]) -> dict:
        return classification_metrics(predictions, [example.target.label for example in examples], self.base.label_names)

    def format_metrics(self, metrics: dict) -> str:
        return self.base.format_metrics(metrics)


# ----------------------------------------------------------------------------------------------------------
# Configuration


def read_teacher_config(teacher: str, checkpoint: str = "best") -> RunConfig:
    """The teacher run's config, after checking that it is a finished classification run with that checkpoint."""
    run = Path(teacher)
    if not (run / "config.yaml").is_file():
        raise PeftlabError(
            f"teacher run {run} not found (expected a run directory with config.yaml). Fix: train a teacher first, "
            "e.g. `peftlab train --task cola` or `python run.py LoRA SEED`, and pass its directory to --teacher"
        )
    config = load_config(run / "config.yaml")
    if config.distill is not None:
        raise PeftlabError(f"teacher {run} is itself a distilled student; give the fine-tuned transformer's run")
    objective = objective_of(config.task.name, config.task.objective)
    if objective != "classification":
        raise PeftlabError(
            f"teacher {run} is a {config.task.name} run with objective '{objective}'; distillation needs a classification "
            "run (a classifier head, e.g. `peftlab train --task cola`)"
        )
    if not any((run / "checkpoints" / checkpoint).glob("*.safetensors")):
        raise PeftlabError(f"teacher {run} has no checkpoint '{checkpoint}' (expected {run / 'checkpoints' / checkpoint}); "
                           "did its training finish an epoch?")
    return config


def check_settings(config: RunConfig) -> None:
    """Clear errors for distillation settings that cannot work."""
    settings = config.distill
    checks = [
        (settings.student in RNN_KINDS, f"student must be one of {', '.join(RNN_KINDS)}, got '{settings.student}'"),
        (settings.layers >= 1, f"student layers must be >= 1, got {settings.layers}"),
        (settings.hidden_size >= 1, f"student hidden size must be >= 1, got {settings.hidden_size}"),
        (settings.embedding_size >= 1, f"student embedding size must be >= 1, got {settings.embedding_size}"),
        (0 <= settings.dropout < 1, f"student dropout must be in [0, 1), got {settings.dropout}"),
        (0 <= settings.alpha <= 1, f"distillation alpha must be in [0, 1], got {settings.alpha}"),
        (settings.temperature > 0, f"temperature must be > 0, got {settings.temperature}"),
        (settings.augment >= 0, f"--augment must be >= 0 copies, got {settings.augment}"),
        (0 <= settings.mask_probability <= 1, f"mask probability must be in [0, 1], got {settings.mask_probability}"),
        (0 <= settings.ngram_probability <= 1, f"n-gram probability must be in [0, 1], got {settings.ngram_probability}"),
        (0 <= settings.edit_probability <= 1, f"edit probability must be in [0, 1], got {settings.edit_probability}"),
        (settings.embedding_init in EMBEDDING_INITS,
         f"embedding init must be one of {', '.join(EMBEDDING_INITS)}, got '{settings.embedding_init}'"),
        (settings.teacher_checkpoint in CHECKPOINTS,
         f"teacher checkpoint must be one of {', '.join(CHECKPOINTS)}, got '{settings.teacher_checkpoint}'"),
        (config.adapter.method == "full",
         f"a distilled student trains all its weights: adapter.method must be 'full', got '{config.adapter.method}'"),
        (not (settings.augment and config.task.train_limit),
         "--train-limit would cut the augmented copies out of the training set; use it with --augment 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise PeftlabError(message)


def distill_config(teacher: str, checkpoint: str = "best") -> RunConfig:
    """A student run's configuration with the defaults of `peftlab distill`: the teacher's model (for its
    tokenizer) and task (same data), a DistilRNN trained for 10 epochs at lr 2e-3; change any field after."""
    teacher_config = read_teacher_config(teacher, checkpoint)
    config = RunConfig(output_dir=f"runs/distill-{Path(teacher).name}")
    config.model = copy.deepcopy(teacher_config.model)
    config.task = copy.deepcopy(teacher_config.task)
    config.adapter.method = "full"
    config.train.epochs, config.train.lr = DISTILL_TRAIN_DEFAULTS["epochs"], DISTILL_TRAIN_DEFAULTS["lr"]
    config.train.device = teacher_config.train.device
    config.distill = DistillConfig(teacher=teacher, teacher_checkpoint=checkpoint)
    return config



def init_student_embedding(student: torch.nn.Module, settings: DistillConfig, vocabulary: StudentVocabulary,
                           load_run: RunLoader) -> None:
    """Start the student's embedding from the teacher's (`embedding_init: teacher`): each known token's row is the
    teacher's input embedding of that token reduced to the student's width by PCA (`principal_components`);
    padding and unknown rows are zero, the mean. Tang et al. 2019 started their BiLSTM from word2vec vectors; here
    the teacher's own table is at hand."""
    _, _, teacher = load_run(settings.teacher, settings.teacher_checkpoint)
    table = teacher.backbone.get_input_embeddings().weight.detach()[list(vocabulary.teacher_ids)]  # (known, width)
    with torch.no_grad():
        student.embedding.weight.zero_()
        rows = vocabulary.encode(vocabulary.teacher_ids)  # the student ids of the known tokens
        student.embedding.weight[rows] = principal_components(table, student.embedding.embedding_dim)


def read_transfer_file(path: str | Path) -> list[tuple[str, str]]:
    """The sentences of a transfer file as (text, origin "file:line") pairs."""
    file = Path(path)
    if not file.is_file():
        raise PeftlabError(f"transfer file {file} not found. Fix: write one with `peftlab transfer-set --teacher RUN_DIR "
                           f"--output {file}`, or pass an existing file (one sentence per line)")
    lines = read_text(file, "transfer file").splitlines()
    sentences = [(line.strip(), f"{file}:{number}") for number, line in enumerate(lines, 1) if line.strip()]
    if not sentences:
        raise PeftlabError(f"transfer file {file} has no sentences (expected one sentence per line)")
    return sentences
