"""Generative QA (W4): SQuAD reader and its checks, official EM/F1, the prompt and answer-only labels,
context windows around the answer (training) and without the answer (evaluation), end to end."""

import json
import os
import subprocess
import sys

import pytest

from peftlab import PeftlabError
from peftlab.cli import main
from peftlab.config import RunConfig
from peftlab.data.squad import read_squad
from peftlab.workloads.loading import get_task
from peftlab.tasks.completion import IGNORE
from peftlab.tasks.metrics import exact_match, f1_score, normalize_answer
from peftlab.engine import write_predictions
from peftlab.train import evaluate_run, train

FILLER = "Nothing of note happened on that day in the quiet town by the river."


def squad_document(paragraphs):
    """SQuAD v1.1 JSON with one article; paragraphs: [(context, [(id, question, answer_text), ...])]."""
    data = []
    for context, questions in paragraphs:
        qas = [{"id": qid, "question": question, "answers": [{"text": answer, "answer_start": context.index(answer)}]}
               for qid, question, answer in questions]
        data.append({"context": context, "qas": qas})
    return {"data": [{"title": "Test_article", "paragraphs": data}], "version": "1.1"}


def write_squad(directory, train_paragraphs, validation_paragraphs) -> str:
    folder = directory / "squad"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dev-split-train.json").write_text(json.dumps(squad_document(train_paragraphs)))
    (folder / "dev-split-validation.json").write_text(json.dumps(squad_document(validation_paragraphs)))
    return str(directory)


def colour_paragraphs(count: int, offset: int = 0):
    colours = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
    names = ["Anna", "Ben", "Carl", "Dora", "Emil", "Fay", "Gus", "Hana", "Ivo", "Jo"]
    return [(f"{names[(i + offset) % 10]} painted the door {colours[(i * 3 + offset) % 8]}.",
             [(f"q{offset}-{i}", f"What colour did {names[(i + offset) % 10]} paint the door?", colours[(i * 3 + offset) % 8])])
            for i in range(count)]


def squad_config(data, **task):
    config = RunConfig()
    config.task.name, config.task.data_dir = "squad", data
    for key, value in task.items():
        setattr(config.task, key, value)
    return config


# --- metrics -----------------------------------------------------------------------------------------------


def test_official_normalisation():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an apple, a pear and THE plum") == "apple pear and plum"
    assert normalize_answer("  theatre  ") == "theatre"  # 'the' only as a whole word


def test_exact_match_and_f1_by_hand():
    assert exact_match("the Denver Broncos", ["Denver Broncos", "Broncos"]) == 1.0
    assert exact_match("Denver", ["Denver Broncos"]) == 0.0
    # prediction "denver broncos team" vs gold "denver broncos": common 2, P = 2/3, R = 1, F1 = 0.8
    assert f1_score("Denver Broncos team", ["Denver Broncos"]) == pytest.approx(0.8)
    # best over references: "broncos" vs "broncos" = 1.0
    assert f1_score("Broncos", ["Denver Broncos", "Broncos"]) == pytest.approx(1.0)
    assert f1_score("", ["Denver Broncos"]) == 0.0
    assert f1_score("the", ["a"]) == 0.0  # both normalise to nothing: no common token (v1.1 definition)
    # repeated tokens count once per occurrence: pred "a b b" vs gold "b b c" -> common 2, P = R = 2/3
    assert f1_score("x y y", ["y y z"]) == pytest.approx(2 / 3)


# --- reader --------------------------------------------------------------------------------------------------


def test_reader_checks_every_answer(tmp_path):
    data = write_squad(tmp_path, colour_paragraphs(3), colour_paragraphs(2, offset=5))
    examples = read_squad("train", data)
    assert len(examples) == 3 and examples[0].answers == ("red",) and examples[0].title == "Test_article"
    path = tmp_path / "squad" / "dev-split-train.json"
    document = json.loads(path.read_text())
    document["data"][0]["paragraphs"][1]["qas"][0]["answers"][0]["answer_start"] += 2
    path.write_text(json.dumps(document))
    with pytest.raises(PeftlabError, match=r"(?s)1 bad answer.*article 'Test_article', question q0-1: context\[23:29\] is 'llow.'"):
        read_squad("train", data)
    del document["data"][0]["paragraphs"][1]["context"]
    path.write_text(json.dumps(document))
    with pytest.raises(PeftlabError, match="lacks a field"):
        read_squad("train", data)
    path.write_text("{not json")
    with pytest.raises(PeftlabError, match="not valid JSON"):
        read_squad("train", data)


def test_the_official_file_names_are_accepted(tmp_path):
    folder = tmp_path / "squad"
    folder.mkdir()
    (folder / "dev-v1.1.json").write_text(json.dumps(squad_document(colour_paragraphs(2))))
    assert len(read_squad("validation", str(tmp_path))) == 2
    with pytest.raises(PeftlabError, match="dev-split-train.json or train-v1.1.json"):
        read_squad("train", str(tmp_path))


# --- encoding ------------------------------------------------------------------------------------------------


def test_prompt_format_and_answer_only_labels(gpt2_tokenizer, tmp_path):
    data = write_squad(tmp_path, colour_paragraphs(4), colour_paragraphs(2, offset=5))
    task = get_task(squad_config(data), gpt2_tokenizer)
    examples = task.encode("train")
    text = gpt2_tokenizer.decode(examples[1].input_ids)
    assert text == "Context: Ben painted the door yellow.\nQuestion: What colour did Ben paint the door?\nAnswer: yellow<|endoftext|>"
    context = gpt2_tokenizer("Context: Ben painted the door yellow.")["input_ids"]
    assert examples[1].shared_length == len(context) and examples[1].input_ids[: len(context)] == context
    for sharing in (True, False):  # one packed row per paragraph, or one row per question: the same targets
        task.shares_prefixes = sharing
        batch = task.collate(examples)
        assert batch["attention_mask"].ndim == (4 if sharing else 2)
        for row, example in enumerate(examples):
            learned = batch["targets"][row][batch["targets"][row] != IGNORE].tolist()
            assert gpt2_tokenizer.decode(learned) == " " + read_squad("train", data)[row].answers[0] + "<|endoftext|>"


def test_long_training_contexts_keep_a_window_around_the_answer(gpt2_tokenizer, tmp_path):
    long_context = " ".join([FILLER] * 20) + " The treasure is buried under the old oak. " + " ".join([FILLER] * 20)
    question = [("t1", "Where is the treasure buried?", "under the old oak")]
    data = write_squad(tmp_path, [(long_context, question)], [(long_context, question)])
    task = get_task(squad_config(data, max_length=64), gpt2_tokenizer)
    (example,) = task.encode("train")
    assert example.length <= 64
    text = gpt2_tokenizer.decode(example.input_ids)
    prompt_context = text.split("\nQuestion:")[0]
    assert "under the old oak" in prompt_context and text.endswith("Answer: under the old oak<|endoftext|>")
    (evaluated,) = task.encode("validation")  # evaluation keeps the beginning: the answer is cut off
    assert evaluated.length <= 64 and evaluated.target.reference.answer_cut
    assert "under the old oak" not in gpt2_tokenizer.decode(evaluated.input_ids).split("\nQuestion:")[0]
    assert task.metrics([""], [evaluated])["answer_cut"] == 1  # counted in the evaluation metrics
    tiny = get_task(squad_config(data, max_length=19), gpt2_tokenizer)  # no room for the 4 answer tokens
    with pytest.raises(PeftlabError, match="all 1 skipped"):
        tiny.encode("train")


def test_answers_stop_at_eos_or_a_newline(gpt2_tokenizer, tmp_path):
    data = write_squad(tmp_path, colour_paragraphs(2), colour_paragraphs(2))
    task = get_task(squad_config(data), gpt2_tokenizer)
    newline_tokens = [gpt2_tokenizer.encode(text)[0] for text in ("\n", "\n\n")]
    assert gpt2_tokenizer.eos_token_id in task.stop_ids and set(newline_tokens) <= task.stop_ids
    assert gpt2_tokenizer.encode(" red")[0] not in task.stop_ids


# --- end to end ------------------------------------------------------------------------------------------------


def test_qa_training_run_selects_by_f1_and_reports_em_f1(tiny_model_dir, tmp_path):
    data = write_squad(tmp_path / "data", colour_paragraphs(40), colour_paragraphs(8, offset=3))
    config = squad_config(data)
    config.output_dir = str(tmp_path / "run")
    config.model.name = tiny_model_dir
    config.adapter.method = "full"
    config.train.epochs, config.train.batch_size, config.train.lr, config.train.device = 3, 8, 1e-2, "cpu"
    summary = train(config)
    assert summary["select_metric"] == "f1" and summary["skipped_examples"] == {"train": 0, "validation": 0}
    best = summary["best"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    # `peftlab eval --predictions` writes a line per validation question.
    predictions = tmp_path / "predictions.jsonl"
    assert main(["eval", str(tmp_path / "run"), "--predictions", str(predictions)]) == 0
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(records) == summary["validation_examples"]
    assert {record["origin"].split()[0] for record in records} == {"dev-split-validation.json"}
    # The best checkpoint's EM and F1, by hand from its answers: every gold answer is one colour word g, so a
    # prediction p (after normalisation) matches exactly when p == g, and overlaps it with precision 1/len(p) and
    # recall 1 when g is one of p's words: F1 = 2 / (len(p) + 1).
    answers = [(normalize_answer(record["prediction"]).split(), record["reference"]["answers"][0]) for record in records]
    exact = [100.0 * (words == [gold]) for words, gold in answers]
    f1 = [100.0 * 2 / (len(words) + 1) if gold in words else 0.0 for words, gold in answers]
    assert [record["exact_match"] for record in records] == exact
    assert [record["f1"] for record in records] == pytest.approx(f1)
    assert best["val_exact_match"] == pytest.approx(sum(exact) / len(exact), abs=1e-9)
    assert best["val_f1"] == pytest.approx(sum(f1) / len(f1), abs=1e-9)
    (tmp_path / "a-file").write_text("")
    for bad in (tmp_path / "a-file" / "p.jsonl", tmp_path):  # under a file; a folder
        with pytest.raises(PeftlabError, match=f"cannot write {bad}"):
            evaluate_run(str(tmp_path / "run"), predictions_file=str(bad))


def test_predictions_file_gives_each_question_its_answers_and_own_em_f1(gpt2_tokenizer, tmp_path):
    data = write_squad(tmp_path, colour_paragraphs(2), colour_paragraphs(3, offset=5))
    task = get_task(squad_config(data), gpt2_tokenizer)
    examples = task.encode("validation")
    gold = [example.target.reference.answers[0] for example in examples]
    predictions = [gold[0], f"the {gold[1]} door", "nothing"]
    write_predictions(tmp_path / "predictions.jsonl", task, predictions, examples)
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [record["prediction"] for record in records] == predictions
    assert records[1]["origin"] == "dev-split-validation.json q5-1"
    assert records[1]["reference"] == {"answers": [gold[1]], "id": "q5-1", "answer_cut": False}
    assert [record["exact_match"] for record in records] == [100, 0, 0]
    # "the X door" vs "X": after normalisation 2 predicted tokens, 1 in common: P 1/2, R 1, F1 2/3.
    assert [record["f1"] for record in records] == pytest.approx([100, 200 / 3, 0])
    # The split's metrics are the means in percent: EM (100 + 0 + 0) / 3, F1 (100 + 200/3 + 0) / 3.
    assert task.metrics(predictions, examples) == pytest.approx(
        {"exact_match": 100 / 3, "f1": 500 / 9, "empty_answers": 0, "answer_cut": 0})
    assert task.metrics(["", gold[1], gold[1]], examples) == pytest.approx(
        {"exact_match": 100 / 3, "f1": 100 / 3, "empty_answers": 1, "answer_cut": 0})


# --- shared contexts (peftlab.shared_prefix) ---------------------------------------------------------------------


def two_painter_paragraphs(count: int, offset: int = 0):
    """Paragraphs with three questions each (the questions on one paragraph share its context)."""
    colours = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
    names = ["Anna", "Ben", "Carl", "Dora", "Emil", "Fay", "Gus", "Hana", "Ivo", "Jo"]
    paragraphs = []
    for i in range(count):
        first, second = names[(i + offset) % 10], names[(i + offset + 3) % 10]
        door, gate = colours[(i * 3 + offset) % 8], colours[(i * 5 + offset + 1) % 8]
        context = f"{first} painted the door {door}. Later {second} painted the gate {gate}."
        paragraphs.append((context, [(f"d{offset}-{i}", "What colour is the door?", door),
                                     (f"g{offset}-{i}", f"What colour did {second} paint the gate?", gate),
                                     (f"w{offset}-{i}", "Who painted the door?", first)]))
    return paragraphs


def qa_run_config(model_dir, data, output_dir, **train):
    config = squad_config(data)
    config.output_dir, config.model.name = str(output_dir), model_dir
    config.adapter.targets, config.adapter.rank, config.adapter.alpha = ["all-linear"], 4, 8.0
    config.train.epochs, config.train.batch_size, config.train.lr, config.train.device = 2, 6, 3e-3, "cpu"
    for key, value in train.items():
        setattr(config.train, key, value)
    return config


@pytest.fixture(scope="module")
def long_tiny_model_dir(tmp_path_factory):
    """The tiny GPT-2 with room for 128 positions: prompts, 32 answer tokens and a prefix-tuning prefix."""
    from tiny_models import tiny_gpt2

    from peftlab.models import gpt2_tokenizer

    directory = tmp_path_factory.mktemp("tiny-gpt2-128")
    tiny_gpt2(seed=0, n_positions=128).save_pretrained(directory)
    gpt2_tokenizer().save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_shared_contexts_evaluate_exactly_like_one_question_at_a_time(long_tiny_model_dir, tmp_path, method):
    """`evaluate` answers from the loss pass's own cache, `predict` from a prefill of each context: both give the
    unshared answers and loss, also with prefix tuning's cache in front."""
    from peftlab.engine import evaluate
    from peftlab.workloads.loading import load_run

    data = write_squad(tmp_path / "data", two_painter_paragraphs(12), two_painter_paragraphs(6, offset=4))
    config = qa_run_config(long_tiny_model_dir, data, tmp_path / "run", epochs=1)
    config.adapter.method, config.train.lr = method, 3e-3 if method == "lora" else 3e-2
    train(config)
    _, task, model = load_run(str(tmp_path / "run"))
    assert task.shares_prefixes
    examples = task.encode("validation")
    shared = evaluate(model, task, examples, batch_size=7, predictions_file=tmp_path / "shared.jsonl")
    task.shares_prefixes = False
    alone = evaluate(model, task, examples, batch_size=7, predictions_file=tmp_path / "alone.jsonl")
    assert shared["loss"] == pytest.approx(alone["loss"], rel=1e-5)
    for metric in ("exact_match", "f1", "empty_answers"):
        assert shared[metric] == alone[metric], metric
    answers = {name: [json.loads(line)["prediction"] for line in (tmp_path / name).read_text().splitlines()]
               for name in ("shared.jsonl", "alone.jsonl")}
    assert answers["shared.jsonl"] == answers["alone.jsonl"]  # question by question, from the loss pass's cache
    predictions = {}
    for sharing in (True, False):
        task.shares_prefixes = sharing
        predictions[sharing] = task.predict(model, examples)
    assert predictions[True] == predictions[False] and len(set(predictions[True])) > 1


def test_shared_contexts_train_alike_with_accumulation_resume_and_two_processes(tiny_model_dir, tmp_path):
    """With shared contexts on: 2 micro-batches, a resumed run and 2 processes all follow the 1-process
    trajectory (the units of one paragraph are never split, so each is the same computation)."""
    data = write_squad(tmp_path / "data", two_painter_paragraphs(16), two_painter_paragraphs(4, offset=4))
    train(qa_run_config(tiny_model_dir, data, tmp_path / "one"))
    train(qa_run_config(tiny_model_dir, data, tmp_path / "accum", grad_accum=2))
    train(qa_run_config(tiny_model_dir, data, tmp_path / "parts"), stop_after_epoch=1)
    train(qa_run_config(tiny_model_dir, data, tmp_path / "parts"), resume=True)
    command = ["train", "--task", "squad", "--model", tiny_model_dir, "--data-dir", data, "--targets", "all-linear",
               "--rank", "4", "--alpha", "8", "--epochs", "2", "--batch-size", "6", "--lr", "3e-3", "--device", "cpu",
               "--output-dir", str(tmp_path / "two")]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "peftlab"]
    result = subprocess.run(launcher + command, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["num_processes"] == 2
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("one", "accum", "parts", "two")}
    assert len(rows["one"]) == 2 and rows["one"][-1]["train_loss"] < rows["one"][0]["train_loss"]
    for name in ("accum", "parts", "two"):
        assert len(rows[name]) == 2, name
        for mine, reference in zip(rows[name], rows["one"]):
            for key in ("train_loss", "val_loss", "lr"):
                assert mine[key] == pytest.approx(reference[key], abs=1e-5), (name, key)
            assert mine["val_f1"] == pytest.approx(reference["val_f1"], abs=1e-9), name


@pytest.mark.slow
def test_real_model_answers_the_first_paragraphs_alike_shared_or_not(smollm2, tmp_path):
    """SmolLM2-135M on the real validation split's first paragraphs: `peftlab eval`'s answers and loss with shared
    contexts are those of every question computed on its own."""
    from pathlib import Path

    from peftlab.engine import evaluate, example_units
    from peftlab.workloads.qa.workload import QATask

    data = os.environ.get("PEFTLAB_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
    if not Path(data, "squad").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"real SQuAD not found in {data}: CI must have ../shared/data beside the clone")
        pytest.skip(f"real SQuAD not found in {data}")
    model, tokenizer = smollm2
    task = QATask(tokenizer, data, 384)
    examples = task.encode("validation")
    units = example_units(examples, True, 16)[:3]
    examples = [examples[index] for unit in units for index in unit]
    assert len(examples) >= 10 and all(len(unit) >= 3 for unit in units)
    results = {}
    for sharing in (True, False):
        task.shares_prefixes = sharing
        path = tmp_path / f"{sharing}.jsonl"
        metrics = evaluate(model.eval(), task, examples, batch_size=16, predictions_file=path)
        results[sharing] = metrics, [json.loads(line)["prediction"] for line in path.read_text().splitlines()]
    assert results[True][1] == results[False][1]
    assert results[True][0]["loss"] == pytest.approx(results[False][0]["loss"], rel=1e-5)


def test_contexts_are_shared_only_where_they_can_be(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import torch

    from peftlab.workloads.loading import build_model, build_task

    data = write_squad(tmp_path / "data", two_painter_paragraphs(2), two_painter_paragraphs(1))
    config = squad_config(data)
    config.model.name = tiny_model_dir
    assert build_task(config).shares_prefixes
    assert not build_task(squad_config(data, share_prefix=False)).shares_prefixes  # --no-share-prefix
    assert not build_task(squad_config(data, loss_on="all")).shares_prefixes  # a learned context is learned once
    reason = "the attention backend 'flash_attention_2' cannot take a block attention mask"
    monkeypatch.setattr("peftlab.workloads.qa.workload.block_mask_unsupported", lambda model: reason)
    task = build_task(config)
    build_model(config, task, torch.device("cpu"))
    assert not task.shares_prefixes and f"Note: contexts are not shared: {reason}" in capsys.readouterr().out
