import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_train import read_rows, tiny_config, write_cola

from peftlab import PeftlabError
from peftlab.cache import stored_fingerprint
from peftlab.workloads.distill import task as distill_module
from peftlab.workloads.distill import transfer as transfer_module
from peftlab.cli import main
from peftlab.config import RunConfig, save_config
from peftlab.workloads.distill import DistillConfig
from peftlab.models import count_parameters, load_tokenizer
from peftlab.tasks import Encoded
from peftlab.train import evaluate_run, train
from peftlab.workloads.loading import get_task, load_run
from peftlab.commands.distill import _seed_config, compare_students, distill
from peftlab.workloads.distill.students import DistilRNN, build_student, principal_components
from peftlab.workloads.distill.task import (
    CACHE_DIR,
    VOCABULARY_FILE,
    DistillationTask,
    StudentVocabulary,
    augment_sentence,
    augmented_copies,
    distill_config,
    distillation_loss,
    edit_words,
    init_student_embedding,
    teacher_logits,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher_run(tiny_model_dir, tmp_path_factory):
    """A tiny GPT-2 LoRA classifier trained for one epoch on synthetic CoLA: (run directory, data directory)."""
    root = tmp_path_factory.mktemp("teacher")
    data = write_cola(root / "data", train_rows=48, dev_rows=24)
    train(tiny_config(tiny_model_dir, data, root / "teacher", epochs=1))
    return str(root / "teacher"), data


def student_config(teacher: str, output_dir, **settings) -> RunConfig:
    config = distill_config(teacher)
    config.output_dir = str(output_dir)
    config.train.epochs, config.train.batch_size, config.train.device = 2, 16, "cpu"
    config.distill.embedding_size, config.distill.hidden_size = 8, 8
    for key, value in settings.items():
        setattr(config.distill, key, value)
    return config


def count_teacher_calls(monkeypatch) -> list[int]:
    """Wrap the teacher's forward passes; returns the list of example counts, one per computation."""
    calls = []
    original = distill_module.compute_teacher_logits

    def counted(teacher, checkpoint, examples, load_run):
        calls.append(len(examples))
        return original(teacher, checkpoint, examples, load_run)

    monkeypatch.setattr(distill_module, "compute_teacher_logits", counted)
    return calls


# ----------------------------------------------------------------------------------------------------------
# The loss


STUDENT = torch.tensor([[0.0, 0.0], [2 * math.log(3), 0.0]])  # T = 2: softmax(s/T) = [1/2, 1/2], [3/4, 1/4]
TEACHER = torch.tensor([[2 * math.log(3), 0.0], [0.0, 0.0]])  # T = 2: softmax(t/T) = [3/4, 1/4], [1/2, 1/2]
LABELS = torch.tensor([0, 1])
KL_TEACHER_STUDENT = ((0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5))
                      + (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))) / 2  # batchmean
# CE at T = 1: row 1 softmax [1/2, 1/2], label 0; row 2 softmax [9/10, 1/10], label 1.
CROSS_ENTROPY = (-math.log(0.5) - math.log(0.1)) / 2


def test_distillation_loss_matches_the_hand_computed_value():
    loss = distillation_loss(STUDENT, TEACHER, LABELS, alpha=0.5, temperature=2.0)
    assert loss.item() == pytest.approx(0.5 * 4 * KL_TEACHER_STUDENT + 0.5 * CROSS_ENTROPY, rel=1e-6)
    assert loss.dtype == torch.float32
    assert distillation_loss(STUDENT.bfloat16(), TEACHER.bfloat16(), LABELS, 0.5, 2.0).dtype == torch.float32


def test_alpha_zero_is_cross_entropy_and_alpha_one_is_t_squared_kl():
    assert distillation_loss(STUDENT, TEACHER, LABELS, 0.0, 2.0).item() == pytest.approx(CROSS_ENTROPY, rel=1e-6)
    assert distillation_loss(STUDENT, TEACHER, LABELS, 0.0, 2.0).item() == pytest.approx(
        F.cross_entropy(STUDENT, LABELS).item(), rel=1e-6)
    assert distillation_loss(STUDENT, TEACHER, LABELS, 1.0, 2.0).item() == pytest.approx(4 * KL_TEACHER_STUDENT, rel=1e-6)
    # T = 1: no scaling, the plain KL of the unscaled distributions (student [1/2, 1/2], [9/10, 1/10]).
    kl_at_1 = ((0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)) + (0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))) / 2
    assert distillation_loss(STUDENT, TEACHER, LABELS, 1.0, 1.0).item() == pytest.approx(kl_at_1, rel=1e-6)


def test_kl_goes_from_the_teacher_to_the_student():
    # One example, T = 2: teacher p = [3/4, 1/4], student q = [1/2, 1/2]; KL(p ‖ q) != KL(q ‖ p).
    teacher_to_student = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    student_to_teacher = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    loss = distillation_loss(STUDENT[:1], TEACHER[:1], LABELS[:1], alpha=1.0, temperature=2.0).item()
    assert loss / 4 == pytest.approx(teacher_to_student, rel=1e-6)
    assert abs(teacher_to_student - student_to_teacher) > 0.01


# ----------------------------------------------------------------------------------------------------------
# Student and vocabulary


def test_vocabulary_keeps_training_tokens_and_maps_the_rest_to_unknown(tmp_path):
    vocabulary = StudentVocabulary.from_examples([Encoded([50, 9, 50], 0, "f:1"), Encoded([7000], 1, "f:2")])
    assert vocabulary.teacher_ids == (9, 50, 7000) and vocabulary.size == 5
    assert vocabulary.encode([50, 9, 123, 7000]) == [3, 2, StudentVocabulary.unknown_id, 4]
    vocabulary.save(tmp_path / "vocabulary.json")
    assert StudentVocabulary.load(tmp_path / "vocabulary.json") == vocabulary
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(PeftlabError, match="not a student vocabulary"):
        StudentVocabulary.load(tmp_path / "bad.json")


def test_student_parameter_count_and_padding_invariance():
    torch.manual_seed(0)
    model = DistilRNN(vocab_size=10, num_labels=2, kind="gru", embedding_size=4, hidden_size=3, layers=2,
                      bidirectional=True)
    gru_layer_1 = 2 * 3 * (3 * 4 + 3 * 3 + 2 * 3)  # 2 directions · 3 gates · (W_ih + W_hh + two biases)
    gru_layer_2 = 2 * 3 * (3 * 6 + 3 * 3 + 2 * 3)  # input: both directions of layer 1
    assert count_parameters(model) == 10 * 4 + gru_layer_1 + gru_layer_2 + (6 * 2 + 2)
    for kind in ("rnn", "gru", "lstm"):
        model = DistilRNN(10, 2, kind, 4, 3, layers=2, bidirectional=True).eval()
        alone = model(torch.tensor([[3, 4, 5]]), torch.ones(1, 3, dtype=torch.long))
        padded = model(torch.tensor([[6, 7, 8, 9, 2], [3, 4, 5, 0, 0]]), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
        torch.testing.assert_close(padded[1:], alone)  # padding never reaches the state, in either direction


def test_augmentation_masks_words_and_samples_ngrams_reproducibly():
    words = [[10], [11, 12], [13], [14], [15], [16], [17]]
    everything_masked = augment_sentence(words, random.Random(0), 1.0, 0.0, mask_id=99)
    assert everything_masked == [99] * 7  # one mask token per word, however many tokens the word had
    assert augment_sentence(words, random.Random(0), 0.0, 0.0, 99) == [10, 11, 12, 13, 14, 15, 16, 17]
    flat = " ".join(map(str, [10, 11, 12, 13, 14, 15, 16, 17]))
    for seed in range(20):
        ngram = augment_sentence(words, random.Random(seed), 0.0, 1.0, 99)
        assert 1 <= len(ngram) <= 6 and " ".join(map(str, ngram)) in flat  # a contiguous run of 1..5 whole words
    assert augment_sentence(words, random.Random(3), 0.3, 0.5, 99) == augment_sentence(words, random.Random(3), 0.3, 0.5, 99)


class ScriptedRandom:
    """A `random.Random` stand-in that returns the given choice and positions, in order."""

    def __init__(self, edit: str, positions: list[int]):
        self.edit, self.positions = edit, iter(positions)

    def choice(self, options):
        assert self.edit in options
        return self.edit

    def randrange(self, stop: int) -> int:
        position = next(self.positions)
        assert 0 <= position < stop
        return position


def test_word_order_edits_swap_delete_and_move_one_word():
    words = ["a", "b", "c", "d"]
    assert edit_words(words, ScriptedRandom("swap", [1])) == ["a", "c", "b", "d"]
    assert edit_words(words, ScriptedRandom("delete", [0])) == ["b", "c", "d"]
    assert edit_words(words, ScriptedRandom("move", [0, 2])) == ["b", "c", "a", "d"]  # take "a", insert before "d"
    assert edit_words(words, ScriptedRandom("move", [3, 3])) == words  # put back where it was: allowed, rare
    assert edit_words(["alone"], random.Random(0)) == ["alone"]
    assert words == ["a", "b", "c", "d"]  # the input is not modified


def test_augmented_copies_with_edits_are_edited_training_sentences(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    texts = ["The cat sat on the mat.", "Mary gave John a book.", "Go!"]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    sentences = [Encoded(row, label, f"train:{index}") for index, (row, label) in enumerate(zip(ids, [1, 1, 0]))]
    settings = DistillConfig()
    settings.augment, settings.mask_probability, settings.ngram_probability = 4, 0.0, 0.0
    unchanged = augmented_copies(sentences, texts, tokenizer, settings, seed=0)
    assert [copy.input_ids for copy in unchanged] == ids * 4  # no edit, no mask, no n-gram: the sentence itself
    settings.edit_probability = 1.0
    edited = augmented_copies(sentences, texts, tokenizer, settings, seed=0)
    assert edited == augmented_copies(sentences, texts, tokenizer, settings, seed=0)  # seeded
    for copy in edited:
        source = texts[int(copy.origin.split(":")[1].split()[0])]
        words, original = tokenizer.decode(copy.input_ids).split(), source.split()
        if len(original) == 1:
            assert words == original
        elif len(words) == len(original):  # a swap or a move keeps every word
            assert sorted(words) == sorted(original)
        else:  # a deletion drops exactly one word and keeps the order of the others
            assert len(words) == len(original) - 1
            assert any(original[:index] + original[index + 1:] == words for index in range(len(original)))
            assert copy.input_ids == tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    assert sum(copy.input_ids != row for copy, row in zip(edited, ids * 4)) >= 6  # most multi-word copies change
    settings.mask_probability, settings.edit_probability = 0.5, 0.0
    generator, mask_id = random.Random(3), tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.eos_token_id
    pieces = [[tokenizer(word if index == 0 else " " + word, add_special_tokens=False)["input_ids"]
               for index, word in enumerate(text.split())] for text in texts]
    expected = [augment_sentence(words, generator, 0.5, 0.0, mask_id) for _ in range(4) for words in pieces]
    assert [copy.input_ids for copy in augmented_copies(sentences, texts, tokenizer, settings, seed=3)] == expected


def test_principal_components_keep_the_geometry_at_full_width_and_fix_signs():
    rows = torch.randn(50, 6, generator=torch.Generator().manual_seed(0)) * torch.tensor([5.0, 3, 2, 1, 0.5, 0.1])
    projected = principal_components(rows, 6)
    assert projected.shape == (50, 6)
    torch.testing.assert_close(projected.std(), torch.tensor(1.0))
    centered = rows - rows.mean(0)
    scale = projected.std() / (centered @ torch.linalg.svd(centered, full_matrices=False)[2].T).std()
    exact = "donot_use_mm_for_euclid_dist"
    torch.testing.assert_close(torch.cdist(projected, projected, compute_mode=exact),
                               scale * torch.cdist(centered, centered, compute_mode=exact), atol=1e-4, rtol=1e-4)
    variances = projected.var(0)
    assert torch.all(variances[:-1] >= variances[1:])  # most variance first
    torch.testing.assert_close(principal_components(-rows, 2), -principal_components(rows, 2))  # same axes: signs fixed
    with pytest.raises(PeftlabError, match="--embedding-size at most 6"):
        principal_components(rows, 7)


def test_student_embedding_starts_from_the_teachers_token_embeddings(teacher_run, tmp_path):
    teacher, data = teacher_run
    config = student_config(teacher, tmp_path / "student", embedding_init="teacher")
    config.task.data_dir = data
    task = DistillationTask(get_task(config, load_tokenizer(config.model.name)), config, load_run)
    student = build_student(config.distill, task.vocabulary, task.num_labels)
    init_student_embedding(student, config.distill, task.vocabulary, load_run)
    _, _, teacher_model = load_run(teacher)
    table = teacher_model.backbone.get_input_embeddings().weight.detach()[list(task.vocabulary.teacher_ids)]
    weight = student.embedding.weight.detach()
    torch.testing.assert_close(weight[2:], principal_components(table, 8))
    assert not weight[:2].any()  # padding and unknown: the mean, zero
    summary = distill(config)  # the training engine applies it: a run trains from there
    assert summary["epochs_completed"] == 2
    bad = student_config(teacher, tmp_path / "bad", embedding_init="glove")
    with pytest.raises(PeftlabError, match="embedding init must be one of random, teacher"):
        distill(bad)


# ----------------------------------------------------------------------------------------------------------
# Teacher-logit cache


def test_teacher_logits_are_cached_until_the_teacher_or_the_data_change(tmp_path, monkeypatch):
    teacher = tmp_path / "teacher"
    save_config(RunConfig(output_dir=str(teacher)), teacher / "config.yaml")
    weights = teacher / "checkpoints" / "best" / "peftlab_adapter.safetensors"
    weights.parent.mkdir(parents=True)
    save_file({"score.weight": torch.zeros(2, 4)}, weights)
    data = tmp_path / "in_domain_train.tsv"
    data.write_text("src\t1\t\tThe cat sat.\nsrc\t0\t*\tCat the.\n")
    examples = [Encoded([464, 3797, 3332], 1, f"{data}:1"), Encoded([21979, 262], 0, f"{data}:2")]
    calls = []

    def fake_teacher(teacher_dir, checkpoint, batch, load_run):
        calls.append(len(batch))
        return torch.full((len(batch), 2), float(len(calls)))

    monkeypatch.setattr(distill_module, "compute_teacher_logits", fake_teacher)
    cache = tmp_path / "run" / CACHE_DIR
    first = teacher_logits(teacher, "best", "train", examples, cache, load_run)
    assert torch.equal(teacher_logits(teacher, "best", "train", examples, cache, load_run), first) and calls == [2]
    fingerprint = stored_fingerprint(cache / "train.safetensors")
    assert fingerprint["split"] == "train" and set(fingerprint["data_files"]) == {"in_domain_train.tsv"}
    assert (cache / "train.safetensors").read_bytes()[8:9] == b"{"  # safetensors: a length, then a JSON header
    assert not (cache / "train.json").exists()  # the fingerprint lives in the file, written with its tensors

    save_file({"score.weight": torch.ones(2, 4)}, weights)  # a retrained teacher
    assert teacher_logits(teacher, "best", "train", examples, cache, load_run)[0, 0] == 2 and len(calls) == 2
    data.write_text("src\t1\t\tThe cat sat down.\nsrc\t0\t*\tCat the.\n")  # changed data
    teacher_logits(teacher, "best", "train", examples, cache, load_run)
    teacher_logits(teacher, "best", "train", examples[:1], cache, load_run)  # other inputs (e.g. augmentation)
    assert len(calls) == 4
    teacher_logits(teacher, "best", "validation", examples, cache, load_run)  # another split has its own cache file
    teacher_logits(teacher, "best", "train", examples[:1], cache, load_run)
    assert len(calls) == 5 and (cache / "validation.safetensors").is_file()

    # A cache written before peftlab.cache (tensors + <split>.json, no fingerprint inside) is recomputed once.
    save_file({"teacher_logits": torch.full((2, 2), 9.0)}, cache / "train.safetensors")
    (cache / "train.json").write_text(json.dumps(fingerprint))
    assert teacher_logits(teacher, "best", "train", examples, cache, load_run)[0, 0] == 6 and len(calls) == 6
    assert teacher_logits(teacher, "best", "train", examples, cache, load_run)[0, 0] == 6 and len(calls) == 6
    # A damaged cache is an error naming the file, not a silent recomputation.
    (cache / "train.safetensors").write_bytes((cache / "train.safetensors").read_bytes()[:-4])
    with pytest.raises(PeftlabError, match=r"cannot read the cache .*train\.safetensors.*Fix: delete"):
        teacher_logits(teacher, "best", "train", examples, cache, load_run)
    assert len(calls) == 6


# ----------------------------------------------------------------------------------------------------------
# End to end on a tiny teacher


def test_distill_run_is_an_ordinary_run_that_reloads_exactly(teacher_run, tiny_model_dir, tmp_path, monkeypatch, capsys):
    teacher, data = teacher_run
    calls = count_teacher_calls(monkeypatch)
    config = student_config(teacher, tmp_path / "student", augment=1)
    distill(config, stop_after_epoch=1)
    distill(config, resume=True)
    assert calls == [2 * 48]  # sentences + one augmented copy each, computed once: the resumed run read the cache
    out = capsys.readouterr().out
    assert "Train Epoch: [1/2], Loss:" in out and "Val Epoch: [2/2], Loss:" in out and "MCC:" in out
    run = tmp_path / "student"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "plots/loss.png", "plots/metrics.png",
                 "checkpoints/best/peftlab_adapter.safetensors", "checkpoints/last/optimizer.safetensors",
                 VOCABULARY_FILE, f"{CACHE_DIR}/train.safetensors"):
        assert (run / name).is_file(), name
    rows = read_rows(run)
    assert [row["epoch"] for row in rows] == [1, 2] and sum(rows[-1]["val_predicted_counts"].values()) == 24
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_examples"] == 96

    # The vocabulary: the teacher tokenizer's ids of the training sentences, nothing else.
    tokenizer = load_tokenizer(tiny_model_dir)
    sentences = [line.split("\t")[3] for line in (Path(data) / "cola/in_domain_train.tsv").read_text().splitlines()]
    vocabulary = StudentVocabulary.load(run / VOCABULARY_FILE)
    token_ids = tokenizer(sentences, add_special_tokens=False)["input_ids"]
    assert vocabulary.teacher_ids == tuple(sorted({token for ids in token_ids for token in ids}))
    student = build_student(config.distill, vocabulary, 2)
    assert summary["parameters"]["total"] == count_parameters(student) == summary["parameters"]["trainable"]
    assert student.embedding.num_embeddings == len(vocabulary.teacher_ids) + 2 < 100  # not 50257 rows

    # Reloading the run (`peftlab eval`, load_run) reproduces the metrics recorded at training time.
    best = summary["best"]
    again = evaluate_run(str(run), "validation", "best")
    assert again["mcc"] == pytest.approx(best["val_mcc"], abs=1e-9)
    assert again["accuracy"] == pytest.approx(best["val_accuracy"], abs=1e-9)
    assert again["loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    assert main(["eval", str(run), "--checkpoint", "last"]) == 0
    assert f"{rows[-1]['val_accuracy']:.4f}" in capsys.readouterr().out
    assert main(["export", str(run), str(tmp_path / "export")]) == 2
    assert "distilled student" in capsys.readouterr().err


def test_compare_prints_one_table_over_seeds(teacher_run, tmp_path, monkeypatch, capsys):
    teacher, _ = teacher_run
    calls = count_teacher_calls(monkeypatch)
    config = student_config(teacher, tmp_path / "compare")
    config.train.epochs = 1
    table_path = compare_students(config, seeds=2)
    assert len(calls) == 1  # the second KD run reused the first one's teacher logits; no-KD runs need none
    table = table_path.read_text()
    lines = table.splitlines()
    assert len(lines) == 5 and "| parameters | accuracy | MCC | sentences/s |" in lines[0]
    assert lines[2].startswith("| teacher teacher (") and "| 1 |" in lines[2] and "| 1.0× |" in lines[2]
    assert lines[3].startswith("| KD student (lstm, alpha 0.5") and "| 2 |" in lines[3] and lines[3].count("±") == 2
    assert lines[4].startswith("| no-KD student (lstm, alpha 0)") and lines[4].count("±") == 2
    assert table in capsys.readouterr().out and (tmp_path / "compare/comparison.png").is_file()
    for run in ("kd-seed0", "kd-seed1", "no-kd-seed0", "no-kd-seed1"):
        assert (tmp_path / "compare" / run / "summary.json").is_file()
    assert not (tmp_path / "compare/no-kd-seed0" / CACHE_DIR).exists()
    assert "alpha: 0.0" in (tmp_path / "compare/no-kd-seed1/config.yaml").read_text()
    # The comparison as one HTML page: its table and plot, then every student run.
    from peftlab.report.html import write_html_report

    page = write_html_report([str(tmp_path / "compare")], tmp_path / "compare.html").read_text()
    assert "no-KD student (lstm, alpha 0)" in page and "alt='comparison.png'" in page
    assert all(f"Run {run}" in page for run in ("kd-seed0", "kd-seed1", "no-kd-seed0", "no-kd-seed1"))
    # Finished runs are reused: a second comparison only evaluates (same numbers; the speeds are measured anew).
    monkeypatch.setattr("peftlab.commands.sweep.train", lambda *args, **kwargs: pytest.fail("trained again"))
    again = compare_students(config, seeds=2).read_text().splitlines()
    assert [line.split("|")[:6] for line in again] == [line.split("|")[:6] for line in lines]


# ----------------------------------------------------------------------------------------------------------
# Errors and entry points


def test_bad_teachers_and_settings_are_clear_errors(teacher_run, tmp_path, capsys):
    teacher, _ = teacher_run
    with pytest.raises(PeftlabError, match="teacher run .*missing.* not found"):
        distill_config(str(tmp_path / "missing"))
    instruct = RunConfig(output_dir=str(tmp_path / "rt"))
    instruct.task.name = "rotten_tomatoes"
    save_config(instruct, tmp_path / "rt" / "config.yaml")
    with pytest.raises(PeftlabError, match="objective 'instruct'; distillation needs a classification run"):
        distill_config(str(tmp_path / "rt"))
    with pytest.raises(PeftlabError, match="has no checkpoint 'nope'"):
        distill_config(teacher, "nope")
    for setting, value, message in (("alpha", 1.5, "alpha must be in"), ("student", "transformer", "student must be one of"),
                                    ("temperature", 0.0, "temperature must be > 0")):
        config = student_config(teacher, tmp_path / "bad", **{setting: value})
        with pytest.raises(PeftlabError, match=message):
            distill(config, dry_run=True)
    config = student_config(teacher, tmp_path / "bad", augment=2)
    config.task.train_limit = 10
    with pytest.raises(PeftlabError, match="--train-limit would cut the augmented copies"):
        distill(config, dry_run=True)
    assert main(["distill", "--teacher", str(tmp_path / "missing")]) == 2
    assert "teacher run" in capsys.readouterr().err
    assert main(["distill", "--teacher", teacher, "--student", "gru", "--hidden-size", "8", "--embedding-size", "8",
                 "--no-bidirectional", "--device", "cpu", "--output-dir", str(tmp_path / "dry"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = int(out.split("Student vocabulary: ")[1].split(" ")[0]) + 2  # + padding, unknown
    gru = 3 * (8 * 8 + 8 * 8 + 2 * 8)  # one direction, 3 gates
    assert f"Trainable parameters: 0.00M ({rows * 8 + gru + 8 * 2 + 2:,})" in out
    assert not (tmp_path / "dry").exists()  # a dry run writes nothing


def test_run_py_distil_trains_a_teacher_only_when_none_is_given(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("run_script", REPO / "run.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    calls = []
    monkeypatch.setattr(script, "main", lambda argv: calls.append(argv) or 0)
    monkeypatch.chdir(tmp_path)

    assert script.run(["distil", "23006", "--augment", "2"]) == 0
    assert calls[0][:3] == ["train", "--recipe", "cola"] and calls[0][-2:] == ["--output-dir", "runs/LoRA-23006"]
    assert calls[1][:3] == ["distill", "--teacher", "runs/LoRA-23006"]
    assert calls[1][calls[1].index("--seed") + 1] == "23006" and calls[1][-2:] == ["--augment", "2"]

    calls.clear()
    assert script.run(["distil", "7", "--teacher", "runs/X", "--alpha", "0"]) == 0
    assert len(calls) == 1 and calls[0][:3] == ["distill", "--teacher", "runs/X"] and calls[0][-2:] == ["--alpha", "0"]
    calls.clear()
    assert script.run(["distil", "7", "--teacher=runs/Y"]) == 0 and calls[0][2] == "runs/Y"

    calls.clear()
    (tmp_path / "runs/LoRA-5").mkdir(parents=True)
    (tmp_path / "runs/LoRA-5/summary.json").write_text("{}")  # a finished teacher is reused
    assert script.run(["distil", "5"]) == 0 and len(calls) == 1 and calls[0][2] == "runs/LoRA-5"

    calls.clear()
    monkeypatch.setattr(script, "main", lambda argv: calls.append(argv) or 2)
    assert script.run(["distil", "6"]) == 2 and len(calls) == 1  # the teacher failed: no distillation
    assert script.run(["distil"]) == 2


# ----------------------------------------------------------------------------------------------------------
# Transfer sets (peftlab.transfer): the teacher labels them


def test_the_teacher_labels_the_transfer_sentences_and_the_no_kd_student_never_sees_them(
        teacher_run, tiny_model_dir, tmp_path, monkeypatch):
    teacher, _ = teacher_run
    transfer = tmp_path / "transfer.txt"
    transfer.write_text("The zebra slept.\nA cat sat quietly.\nquietly zebra the.\n", encoding="utf-8")
    calls = count_teacher_calls(monkeypatch)
    config = student_config(teacher, tmp_path / "student", transfer_file=str(transfer))
    summary = distill(config)
    assert calls == [48 + 3] and summary["train_examples"] == 48 + 3
    tokenizer = load_tokenizer(tiny_model_dir)
    vocabulary = StudentVocabulary.load(tmp_path / "student" / VOCABULARY_FILE)
    zebra = tokenizer(" zebra", add_special_tokens=False)["input_ids"]
    assert set(zebra) <= set(vocabulary.teacher_ids)  # a word only the transfer set has is in the vocabulary

    task = DistillationTask(get_task(config, tokenizer), config, load_run)
    examples = task.encode("train")
    logits = torch.tensor([example.target.teacher_logits for example in examples[-3:]])
    assert [example.target.label for example in examples[-3:]] == logits.argmax(-1).tolist()
    assert examples[-1].origin == f"{transfer}:3"
    assert _seed_config(config, 1, "no-kd").distill.transfer_file == ""
    augmented = student_config(teacher, tmp_path / "augmented", augment=2, edit_probability=1.0, mask_probability=0.0)
    plain = student_config(teacher, tmp_path / "augmented", alpha=0.3)
    # the no-KD student does not depend on how the KD student's transfer set was made: its runs can be shared
    assert _seed_config(augmented, 1, "no-kd").to_dict() == _seed_config(plain, 1, "no-kd").to_dict()

    long_line = tmp_path / "long.txt"
    long_line.write_text("cat " * 200 + ".\n", encoding="utf-8")
    bad = student_config(teacher, tmp_path / "bad", transfer_file=str(long_line))
    with pytest.raises(PeftlabError, match=f"{long_line}:1: .* tokens; a transfer sentence needs 1 to --max-length"):
        distill(bad)


def test_transfer_set_command_writes_the_kept_sentences(teacher_run, tiny_model_dir, tmp_path, monkeypatch, capsys):
    teacher, _ = teacher_run
    tokenizer = load_tokenizer(tiny_model_dir)
    samples = iter(tokenizer(f" number {index} sat.\nnext", add_special_tokens=False)["input_ids"] for index in range(1000))
    calls = []

    def fake_generate_batch(model, prompts, max_new_tokens, stop_ids, pad_id, pick_next, stop_strings, detokenize):
        calls.append(max_new_tokens)
        assert tokenizer.eos_token_id in stop_ids and tokenizer("\n")["input_ids"][0] in stop_ids
        assert stop_strings == [] and detokenize([464]) == tokenizer.decode([464])
        return [next(samples) for _ in prompts]

    monkeypatch.setattr(transfer_module, "decode", fake_generate_batch)
    output = tmp_path / "transfer.txt"
    assert main(["transfer-set", "--teacher", teacher, "--output", str(output), "--size", "5", "--batch-size", "4",
                 "--max-new-tokens", "7"]) == 0
    lines = output.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5 and all(" number " in line and line.endswith(" sat.") for line in lines)
    assert calls == [7, 7] and "wrote 5 sentences" in capsys.readouterr().out
    assert main(["transfer-set", "--teacher", teacher, "--output", str(output), "--size", "0"]) == 2
    assert "--size must be >= 1" in capsys.readouterr().err

    monkeypatch.undo()  # the real tiny (random) model: it rarely ends a sentence, and says so
    assert main(["transfer-set", "--teacher", teacher, "--output", str(tmp_path / "random.txt"), "--size", "2",
                 "--batch-size", "4", "--max-new-tokens", "4"]) == 0
    written = read_lines(tmp_path / "random.txt")
    assert len(written) <= 2 and ("warning: asked for 2 sentences" in capsys.readouterr().out) == (len(written) < 2)


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_comparison_table_by_hand():
    from peftlab.commands.distill import comparison_table

    results = {"teacher": [{"accuracy": 0.8, "mcc": 0.5, "examples_per_second": 10.0, "parameters": 1_000}],
               "student": [{"accuracy": 0.7, "mcc": 0.3, "examples_per_second": 100.0, "parameters": 10},
                           {"accuracy": 0.6, "mcc": 0.1, "examples_per_second": 300.0, "parameters": 10}]}
    lines = comparison_table(results).splitlines()
    assert lines[2] == "| teacher | 1 | 1,000 | 0.8000 | 0.5000 | 10.0 | 1.0× |"
    # mean ± sample std over the two runs; speed-up = mean speed / the first row's
    assert lines[3] == "| student | 2 | 10 | 0.6500 ± 0.0707 | 0.2000 ± 0.1414 | 200.0 | 20.0× |"
