"""Using what was trained: `peftlab predict` and `peftlab.load_run(...).predict` for every kind of run (a predict
equals what eval computes for the same example), input files and their errors, `generate` in the run's format,
eval's results in the run and its predictions file."""

import copy
import json
import math
import re
import shutil

import pytest
from test_instruct import instruct_config
from test_qa import colour_paragraphs, qa_run_config, write_squad
from test_train import tiny_config
from tiny_data import write_cola, write_rotten_tomatoes

import peftlab
from peftlab import PeftlabError
from peftlab.cli import main
from peftlab.generate import chat_prompts
from peftlab.runs import RunDir
from peftlab.train import evaluate_run, train
from peftlab.workloads.distill.task import distill_config


@pytest.fixture(scope="module")
def cola_run(tiny_model_dir, tmp_path_factory):
    """A tiny GPT-2 LoRA classifier (one epoch of synthetic CoLA): its run directory."""
    root = tmp_path_factory.mktemp("cola")
    train(tiny_config(tiny_model_dir, write_cola(root / "data", train_rows=48, dev_rows=24), root / "run", epochs=1))
    return str(root / "run")


@pytest.fixture(scope="module")
def student_run(cola_run, tmp_path_factory):
    """A tiny LSTM student distilled from `cola_run`."""
    config = distill_config(cola_run)
    config.output_dir = str(tmp_path_factory.mktemp("student") / "run")
    config.train.epochs, config.train.batch_size, config.train.device = 1, 16, "cpu"
    config.distill.embedding_size, config.distill.hidden_size = 8, 8
    train(config)
    return config.output_dir


@pytest.fixture(scope="module")
def instruct_run(tiny_model_dir, tmp_path_factory):
    """A tiny GPT-2 instruction-tuned on synthetic Rotten Tomatoes, predicting by generation and by score."""
    root = tmp_path_factory.mktemp("rt")
    config = instruct_config(tiny_model_dir, write_rotten_tomatoes(root / "data"), root / "run",
                             train_limit=64, eval_limit=16, predict="both")
    config.train.epochs = 1
    train(config)
    return str(root / "run")


@pytest.fixture(scope="module")
def qa_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("qa")
    data = write_squad(root / "data", colour_paragraphs(12), colour_paragraphs(6, offset=3))
    train(qa_run_config(tiny_model_dir, data, root / "run", epochs=1))
    return str(root / "run")


def eval_records(run: str, tmp_path, limit: int = 0) -> list[dict]:
    path = tmp_path / "eval-predictions.jsonl"
    evaluate_run(run, "validation", limit=limit, predictions_file=str(path))
    return [json.loads(line) for line in path.read_text().splitlines()]


def stdout_records(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("kind", ["classifier", "student"])
def test_a_classifier_predicts_what_eval_computes_with_label_names_and_probabilities(kind, cola_run, student_run,
                                                                                      tmp_path):
    run = cola_run if kind == "classifier" else student_run
    evaluated = eval_records(run, tmp_path)
    assert all(isinstance(record["input"], str) and record["input"] for record in evaluated)
    predicted = peftlab.load_run(run).predict([record["input"] for record in evaluated], batch_size=5)
    assert len(predicted) == len(evaluated)
    for mine, theirs in zip(predicted, evaluated):
        assert mine["input"] == theirs["input"]
        assert mine["label"] == theirs["prediction"]  # eval's prediction is the label index
        assert mine["label_names"] == theirs["label_names"] == ["unacceptable", "acceptable"]
        assert mine["prediction"] == mine["label_names"][mine["label"]]
        assert mine["probabilities"] == pytest.approx(theirs["probabilities"], abs=1e-5)
        assert math.fsum(mine["probabilities"]) == pytest.approx(1.0, abs=1e-6)
        assert max(range(2), key=mine["probabilities"].__getitem__) == mine["label"]


def test_an_instruct_run_predicts_in_its_mode_with_its_template(instruct_run, tmp_path):
    evaluated = eval_records(instruct_run, tmp_path, limit=16)
    run = peftlab.load_run(instruct_run)
    predicted = run.predict([record["input"] for record in evaluated], batch_size=4)
    for mine, theirs in zip(predicted, evaluated):
        assert mine["label"] == theirs["prediction"]["generate"]  # --predict both: the generated label leads
        assert mine["generated"] == theirs["prediction"]["text"]
        assert mine["label_names"] == ["negative", "positive"]
        assert math.fsum(mine["probabilities"]) == pytest.approx(1.0, abs=1e-6)
        # The probabilities are the verbalisers' scores: their argmax is the scored label.
        assert max(range(2), key=mine["probabilities"].__getitem__) == theirs["prediction"]["score"]
        assert mine["probabilities"] == pytest.approx(theirs["probabilities"], abs=1e-5)
    # The prompt is the run's template around the text.
    example = run.encode("the film is great .", "x")
    assert run.task.tokenizer.decode(example.input_ids) == "Review: the film is great .\nSentiment:"


def test_a_qa_run_answers_from_jsonl_and_text_like_eval(qa_run, tmp_path, capsys):
    evaluated = eval_records(qa_run, tmp_path)
    assert all(set(record["input"]) == {"context", "question"} for record in evaluated)
    inputs = tmp_path / "questions.jsonl"
    inputs.write_text("".join(json.dumps(record["input"] | {"id": number}) + "\n"
                              for number, record in enumerate(evaluated)))
    capsys.readouterr()
    assert main(["predict", qa_run, "--input", str(inputs), "--batch-size", "3"]) == 0
    predicted = stdout_records(capsys)
    assert [record["prediction"] for record in predicted] == [record["prediction"] for record in evaluated]
    assert predicted[0]["input"]["id"] == 0 and predicted[0]["context_cut"] is False  # other keys are kept
    first = evaluated[0]["input"]
    as_text = f"{first['context']}\\n{first['question']}"  # the escape as typed on a command line
    assert main(["predict", qa_run, "--text", as_text]) == 0
    assert stdout_records(capsys)[0]["prediction"] == evaluated[0]["prediction"]


def test_the_command_line_reads_texts_and_files_and_writes_output_only_when_allowed(cola_run, tmp_path, capsys):
    texts = tmp_path / "reviews.txt"
    texts.write_text("the cat sat .\n\nthe dog ran quickly .\n")
    capsys.readouterr()
    assert main(["predict", cola_run, "--text", "a big cat .", "--input", str(texts)]) == 0
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]  # stdout holds the records only
    assert [record["input"] for record in records] == ["a big cat .", "the cat sat .", "the dog ran quickly ."]
    assert records == peftlab.load_run(cola_run).predict(["a big cat .", "the cat sat .", "the dog ran quickly ."])
    output = tmp_path / "out.jsonl"
    assert main(["predict", cola_run, "--input", str(texts), "--output", str(output)]) == 0
    assert [json.loads(line) for line in output.read_text().splitlines()] == records[1:]
    output.write_text("keep me\n")
    assert main(["predict", cola_run, "--text", "x", "--output", str(output)]) == 2
    assert "exists; nothing was written" in capsys.readouterr().err and output.read_text() == "keep me\n"
    assert main(["predict", cola_run, "--text", "x", "--output", str(output), "--overwrite"]) == 0
    assert json.loads(output.read_text())["input"] == "x"


@pytest.mark.parametrize("lines, message", [
    (['{"text": "the cat sat ."}', '{"sentence": "the cat"}'], r"bad.jsonl:2: no text field 'text'"),
    (['{"text": "the cat sat ."}', "", "{not json"], r"bad.jsonl:3: not a JSON object"),
    (['["the cat"]'], r"bad.jsonl:1: a JSON line must be an object"),
    ([""], r"bad.jsonl has no input"),
])
def test_input_file_errors_name_the_file_and_line(lines, message, cola_run, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert main(["predict", cola_run, "--input", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert re.search(message, err)


def test_inputs_a_run_cannot_read_are_errors_naming_them(cola_run, qa_run):
    classifier = peftlab.load_run(cola_run)
    with pytest.raises(PeftlabError, match="input 2: .* more than the run's max length"):
        classifier.predict(["the cat", "cat " * 300])
    with pytest.raises(PeftlabError, match="input 1: the input is empty"):
        classifier.predict([""])
    with pytest.raises(PeftlabError, match="input 1: a qa input given as one text is the context, a new line"):
        peftlab.load_run(qa_run).predict("What colour is the door?")
    with pytest.raises(PeftlabError, match="input 1: no text field 'question'"):
        peftlab.load_run(qa_run).predict({"context": "Anna painted the door red."})
    with pytest.raises(PeftlabError, match="no checkpoint 'nope'"):
        peftlab.load_run(cola_run, checkpoint="nope")


def generated_prompts(output: str) -> list[str]:
    """The prompts `generate` printed (each block: a '--- prompt N, sample 1 ---' line, the prompt + text)."""
    blocks = output.split("--- prompt ")[1:]
    return [block.split("---\n", 1)[1] for block in blocks]


def test_generate_uses_the_runs_format_unless_raw_and_expands_escapes(instruct_run, qa_run, cola_run, capsys):
    common = ["--max-new-tokens", "2"]
    assert main(["generate", "--model", instruct_run, "--prompt", "a great film", *common]) == 0
    assert generated_prompts(capsys.readouterr().out)[0].startswith("Review: a great film\nSentiment:")
    assert main(["generate", "--model", instruct_run, "--prompt", "Tab\\there\\nnext \\\\n", "--raw", *common]) == 0
    assert generated_prompts(capsys.readouterr().out)[0].startswith("Tab\there\nnext \\n")
    assert main(["generate", "--model", qa_run, "--prompt", "Anna painted the door red.\\nWhat colour?", *common]) == 0
    assert generated_prompts(capsys.readouterr().out)[0].startswith(
        "Context: Anna painted the door red.\nQuestion: What colour?\nAnswer:")
    assert main(["generate", "--model", cola_run, "--prompt", "x"]) == 2
    assert "peftlab predict" in capsys.readouterr().err
    # The tiny GPT-2's tokenizer has no chat template: refused, with the fix.
    assert main(["generate", "--model", instruct_run, "--prompt", "hi", "--chat", *common]) == 2
    assert "has no chat template" in capsys.readouterr().err


def test_chat_prompts_apply_the_tokenizers_template(gpt2_tokenizer):
    tokenizer = copy.deepcopy(gpt2_tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>"
                               "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    assert chat_prompts(tokenizer, ["Hello\nthere"], "tiny") == ["<user>Hello\nthere</user><assistant>"]


def test_eval_writes_its_metrics_into_the_run_without_replacing_another_evaluation(cola_run, tmp_path):
    run_copy = tmp_path / "run"
    shutil.copytree(cola_run, run_copy)
    shutil.rmtree(run_copy / "eval", ignore_errors=True)
    metrics = evaluate_run(str(run_copy), "validation", limit=8)
    written = json.loads((run_copy / "eval" / "validation.json").read_text())
    assert written["metrics"]["mcc"] == metrics["mcc"] and written["metrics"]["loss"] == pytest.approx(metrics["loss"])
    assert [written[key] for key in ("split", "checkpoint", "limit", "examples")] == ["validation", "best", 8, 8]
    assert written["data_dir"] and written["time"]
    assert main(["eval", str(run_copy), "--checkpoint", "last"]) == 0
    other_data = tmp_path / "other-data"
    shutil.copytree(RunDir(run_copy).read_config().task.data_dir, other_data)
    assert main(["eval", str(run_copy), "--data-dir", str(other_data)]) == 0
    files = sorted(path.name for path in (run_copy / "eval").iterdir())
    assert files[:2] == ["validation-data-" + files[0].split("-data-")[1], "validation-last.json"] and len(files) == 3
    assert json.loads((run_copy / "eval" / "validation.json").read_text()) == written  # untouched
    assert json.loads((run_copy / "eval" / files[0]).read_text())["data_dir"] == str(other_data.resolve() / "cola")


@pytest.mark.slow
def test_chat_prompts_make_smollm2_answer(capsys):
    assert main(["generate", "--model", "smollm2-135m", "--chat", "--prompt", "What is the capital of France?",
                 "--temperature", "0", "--max-new-tokens", "8"]) == 0
    assert "<|im_start|>assistant\nThe capital of France is Paris" in capsys.readouterr().out


def test_eval_predict_and_generate_run_on_packed_weights_and_keep_their_own_results(instruct_run, tmp_path, capsys):
    run_copy = tmp_path / "run"
    shutil.copytree(instruct_run, run_copy)
    shutil.rmtree(run_copy / "eval", ignore_errors=True)
    exact = evaluate_run(str(run_copy), "validation")
    assert main(["eval", str(run_copy), "--weights", "fp16"]) == 0
    assert "examples, fp16 weights): Loss" in capsys.readouterr().out
    packed = json.loads((run_copy / "eval" / "validation-fp16.json").read_text())
    assert packed["weights"] == "fp16" and packed["metrics"]["loss"] == pytest.approx(exact["loss"], rel=1e-3)
    assert json.loads((run_copy / "eval" / "validation.json").read_text())["weights"] == "fp32"  # not replaced
    assert main(["eval", str(run_copy), "--weights", "int8", "--merge-for-evaluation"]) == 2
    assert "add --no-merge-for-evaluation" in capsys.readouterr().err
    assert main(["predict", str(run_copy), "--text", "A gripping film.", "--weights", "int8"]) == 0
    assert [record["input"] for record in stdout_records(capsys)] == ["A gripping film."]
    assert main(["generate", "--model", str(run_copy), "--prompt", "A gripping film.", "--weights", "fp16",
                 "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert "--weights fp16: " in capsys.readouterr().out
