"""In-context learning (W6): scoring after demonstrations computed once equals the full prompts recomputed, the
demonstrations' forward runs once per set, calibration and acc_norm by hand, balanced draws, the command's run
directory, and its bad-input errors (exit 2)."""

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from tiny_data import write_cola, write_rotten_tomatoes
from tiny_models import tiny_gpt2, tiny_llama

from peftlab.cli import main
from peftlab.config import RunConfig
from peftlab.models import convert_conv1d_to_linear, load_tokenizer
from peftlab.train import train
from peftlab.workloads.icl import IclConfig, command, evaluation, scoring, templates
from peftlab.workloads.icl.evaluation import (
    IclExample,
    PromptBuilder,
    demonstration_order,
    evaluate_set,
    parse_label,
)
from peftlab.workloads.icl.scoring import (
    SharedRows,
    choice_loglikelihoods,
    content_free_prior,
    label_predictions,
)
from peftlab.workloads.icl.templates import resolve_format
from peftlab.workloads.instruct import InstructConfig
from peftlab.workloads.loading import load_run

COT_FILE = Path(__file__).parent.parent / "examples" / "cot-arithmetic.jsonl"
SENTENCES = ["the film is great .", "a movie with awful plot .", "story", "the plot is a story with great film ."]


def examples(texts, labels, verbalizers):
    return [IclExample({"text": text}, verbalizers[label], label, (), f"made-up:{line}")
            for line, (text, label) in enumerate(zip(texts, labels), start=1)]


def full_prompt_loglikelihoods(model, rows, choices):
    """log p(choice | row), one unpadded forward pass per (row, choice): the reference."""
    result = torch.zeros(len(rows), len(choices))
    for i, row in enumerate(rows):
        for j, choice in enumerate(choices):
            ids = torch.tensor([list(row) + list(choice)])
            with torch.no_grad():
                log_probs = model(input_ids=ids).logits[0].float().log_softmax(-1)
            result[i, j] = sum(log_probs[len(row) - 1 + t, token] for t, token in enumerate(choice))
    return result


@pytest.fixture(scope="module")
def rt_data(tmp_path_factory):
    return write_rotten_tomatoes(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, rt_data, tmp_path_factory):
    """A causal-LM LoRA run (instruct, a few steps, so its adapter is not the identity)."""
    config = RunConfig(output_dir=str(tmp_path_factory.mktemp("runs") / "lora"))
    config.model.name = tiny_model_dir
    config.task.name, config.task.data_dir, config.task.train_limit, config.task.eval_limit = (
        "rotten_tomatoes", rt_data, 64, 16)
    config.adapter.targets, config.adapter.rank, config.adapter.alpha = ["all-linear"], 4, 8
    config.train.epochs, config.train.batch_size, config.train.lr, config.train.device = 1, 16, 1e-2, "cpu"
    config.task.test_limit = 8
    config.instruct = InstructConfig(template="review")
    train(config)
    return config.output_dir


def tiny_models():
    gpt2 = tiny_gpt2(seed=1, n_positions=256)
    convert_conv1d_to_linear(gpt2)
    return {"gpt2": gpt2, "llama": tiny_llama(seed=1)}


@pytest.mark.parametrize("family", ["gpt2", "llama", "lora-run"])
@pytest.mark.parametrize("verbalizers", [("no", "yes"), ("awful movie", "great")])
def test_shared_demonstrations_score_as_the_full_prompts(family, verbalizers, gpt2_tokenizer, lora_run):
    """Rows of different lengths (left padding inside each batch), batches of 2, single- and multi-token answers."""
    model = load_run(lora_run)[2].eval() if family == "lora-run" else tiny_models()[family]
    prompt_format = resolve_format("rotten_tomatoes", "{sentence}\\nA:", list(verbalizers), 2, chat=False)
    builder = PromptBuilder(prompt_format, gpt2_tokenizer, chat=False)
    demonstrations = examples(SENTENCES[:2], [1, 0], verbalizers)
    rows = builder.rows(demonstrations, [{"text": text} for text in SENTENCES[1:] + ["N/A", ""]])
    assert len({len(row) for row in rows}) > 2
    choices = [builder.answer_tokens(verbalizer) for verbalizer in verbalizers]
    shared = SharedRows(model, rows, gpt2_tokenizer.pad_token_id)
    shown = "\n\n".join(prompt_format.prompt(d.fields) + prompt_format.answer(d.answer) for d in demonstrations)
    assert shared.shared >= len(builder.tokens([shown])[0]) - 1  # the demonstrations (but a token at their end)
    scored = choice_loglikelihoods(model, shared, choices, gpt2_tokenizer.pad_token_id, batch_size=2)
    torch.testing.assert_close(scored, full_prompt_loglikelihoods(model, rows, choices), atol=1e-4, rtol=0)


def test_shared_length_leaves_every_row_a_token_of_its_own():
    assert scoring.shared_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 4, 6]]) == 3
    assert scoring.shared_length([[1, 2], [1, 2, 3]]) == 1
    assert scoring.shared_length([[7, 2], [1, 2]]) == 0


def test_the_demonstrations_forward_runs_once_per_set(gpt2_tokenizer):
    model = tiny_models()["gpt2"]
    widths = []  # the input width of every pass through the transformer body (however the LM head is applied)
    model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append((args[0] if args else kwargs["input_ids"]).shape[1]),
        with_kwargs=True)
    prompt_format = resolve_format("rotten_tomatoes", "review", None, 2, chat=False)
    builder = PromptBuilder(prompt_format, gpt2_tokenizer, chat=False)
    demonstrations = examples(SENTENCES[:2], [1, 0], prompt_format.verbalizers)
    test = examples(SENTENCES * 2, [1, 0, 0, 1] * 2, prompt_format.verbalizers)
    settings = IclConfig(predict="both", batch_size=3, max_new_tokens=2)
    result = evaluate_set(model, builder, "rotten_tomatoes", settings, test, demonstrations, ("negative", "positive"))
    shown = "\n\n".join(prompt_format.prompt(d.fields) + prompt_format.answer(d.answer) for d in demonstrations)
    assert result.prefix_tokens >= len(builder.tokens([shown])[0]) - 1  # all of the demonstrations, give or take
    # One pass over the shared tokens; then each batch of 3 passes only its own tokens: scoring 11 rows (8 test +
    # 3 content-free) in 4 batches, generating 8 rows in 3 batches of at most 2 steps each.
    assert widths[0] == result.prefix_tokens and max(widths[1:]) < result.prefix_tokens
    assert 1 + 4 + 3 <= len(widths) <= 1 + 4 + 3 * 2
    assert set(result.metrics) == {"raw", "norm", "calibrated", "generate"} and len(result.records) == 8


def test_calibration_and_length_normalisation_by_hand():
    # Two test examples, labels 'no' (2 characters) and 'positive' (8).
    test = torch.log(torch.tensor([[0.30, 0.20], [0.04, 0.01]]))
    content_free = torch.log(torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.5, 0.5]]))
    prior = content_free_prior(content_free)
    # p_cf = mean of the normalised probabilities: [(0.8 + 0.6 + 0.5) / 3, (0.2 + 0.4 + 0.5) / 3]
    torch.testing.assert_close(prior, torch.tensor([1.9 / 3, 1.1 / 3]))
    predicted = label_predictions(test, [2, 8], prior)
    assert predicted["raw"] == [0, 0]
    # example 1: p = [0.6, 0.4] -> [0.6 / 0.633, 0.4 / 0.367] = [0.947, 1.091] -> 1; example 2: p = [0.8, 0.2] -> 0
    assert predicted["calibrated"] == [1, 0]
    # acc_norm: log p / characters: [-1.204 / 2, -1.609 / 8] -> 1; [-3.219 / 2, -4.605 / 8] -> 1
    assert predicted["norm"] == [1, 1]


def test_balanced_draws_take_the_labels_in_turn_and_are_seeded():
    pool = examples([f"sentence {i}" for i in range(30)], [0] * 20 + [1] * 10, ("no", "yes"))
    order = demonstration_order(pool, 16, seed=3, balanced=True)
    labels = [pool[i].label for i in order]
    assert len(set(order)) == 16 and all(a != b for a, b in zip(labels, labels[1:]))
    assert order == demonstration_order(pool, 16, seed=3, balanced=True)
    assert order != demonstration_order(pool, 16, seed=4, balanced=True)
    assert demonstration_order(pool, 8, seed=3, balanced=False)[:4] == demonstration_order(pool, 4, 3, False)[:4]
    with pytest.raises(Exception, match="more examples of a label"):
        demonstration_order(pool, 24, seed=0, balanced=True)  # 12 of label 1 needed, 10 there


@pytest.mark.parametrize("text, expected", [(" yes.", 1), ("No, it", 0), ("maybe", -1), ("yesterday", -1), ("", -1)])
def test_generated_answers_are_parsed_or_unparsable(text, expected):
    assert parse_label(text, ("no", "yes")) == expected


def icl(arguments, data, output):
    return main(["icl", "--task", "rotten_tomatoes", "--data-dir", data, "--output-dir", str(output), *arguments])


def test_icl_run_directory_from_a_lora_run(lora_run, tiny_model_dir, rt_data, tmp_path):
    arguments = ["--shots", "0,1", "--demo-seeds", "2", "--limit", "6", "--format", "review", "--predict", "both",
                 "--max-new-tokens", "2"]
    assert icl(["--model", lora_run, *arguments], rt_data, tmp_path / "run") == 0
    assert icl(["--model", tiny_model_dir, *arguments], rt_data, tmp_path / "base") == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["kind"] == "icl" and results["run"] == lora_run and results["examples"] == 6
    assert [(s["seed"], s["shots"]) for s in results["sets"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert {row["mode"] for row in results["summary"]} == {"raw", "norm", "calibrated", "generate"}
    one_k = next(row for row in results["summary"] if row["shots"] == 1 and row["mode"] == "raw")
    per_seed = [s["metrics"]["raw"]["accuracy"] for s in results["sets"] if s["shots"] == 1]
    assert one_k["mean"] == pytest.approx(sum(per_seed) / 2) and one_k["seeds"] == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    base = [json.loads(line) for line in (tmp_path / "base" / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 * 6
    assert records[0]["loglikelihoods"] != base[0]["loglikelihoods"]  # the adapter is on
    # The recorded log-likelihoods are the run's model on the whole prompt.
    _, _, model = load_run(lora_run)
    prompt_format = resolve_format("rotten_tomatoes", "review", None, 2, chat=False)
    builder = PromptBuilder(prompt_format, load_tokenizer(tiny_model_dir), chat=False)
    first = next(r for r in records if r["shots"] == 1)
    demonstrations = [e for e in evaluation.read_examples("rotten_tomatoes", "train", rt_data, prompt_format)
                      if e.origin == results["sets"][1]["demonstrations"][0]]
    test = [e for e in evaluation.read_examples("rotten_tomatoes", "validation", rt_data, prompt_format)
            if e.origin == first["origin"]]
    rows = builder.rows(demonstrations, [test[0].fields])
    choices = [builder.answer_tokens(v) for v in prompt_format.verbalizers]
    torch.testing.assert_close(torch.tensor([first["loglikelihoods"]]),
                               full_prompt_loglikelihoods(model.eval(), rows, choices), atol=1e-4, rtol=0)
    table = (tmp_path / "run" / "results.md").read_text()
    assert "| 1 | " in table and "calibrated" in table
    assert (tmp_path / "run" / "plots" / "icl.png").stat().st_size > 0
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "icl:" in config and "command: peftlab icl --task rotten_tomatoes" in config
    # `peftlab report` and --html show an icl run's own tables and plot beside a trained run's row.
    assert main(["report", lora_run, str(tmp_path / "run"), "--output-dir", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert f"| {Path(lora_run).name} |" in report and "| run |" in report  # the trained run's row
    assert "## In-context learning: run" in report and table.splitlines()[-3] in report
    assert main(["report", lora_run, str(tmp_path / "run"), "--html", str(tmp_path / "page.html")]) == 0
    page = (tmp_path / "page.html").read_text()
    assert "<h2>In-context learning: run</h2>" in page and "calibrated" in page and "alt='icl.png'" in page
    assert "peftlab icl --task rotten_tomatoes" in page


def test_a_k_that_does_not_fit_names_k_and_the_overflow(tiny_model_dir, rt_data, tmp_path, capsys, monkeypatch):
    # The tiny model reads 64 tokens; a review prompt takes about 10, so 16 demonstrations cannot fit. Its
    # config.json says so: the check comes before the weights load.
    monkeypatch.setattr(command, "load_icl_model", lambda *_: pytest.fail("the model was loaded"))
    code = icl(["--model", tiny_model_dir, "--shots", "0,16", "--demo-seeds", "1", "--limit", "4"], rt_data,
               tmp_path / "run")
    error = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "run" / "config.yaml").exists()
    match = re.search(r"--shots 16 does not fit the model's context of 64 tokens: .* the prompt of (\S+) takes (\d+) "
                      r"tokens and its answer up to (\d+) more, (\d+) tokens too many", error)
    assert match, error
    assert int(match[2]) + int(match[3]) - 64 == int(match[4]) > 0
    assert int(match[3]) == 1  # " negative" and " positive" are one GPT-2 token each


@pytest.mark.parametrize("arguments, message", [
    (["--format", "Review:\\nSentiment:"], "one field is the input"),
    (["--format", "{text}\\nSentiment:"], "one field is the input"),
    (["--verbalizers", "bad"], "needs 2 comma-separated answers"),
    (["--shots", "1,x"], "comma-separated whole numbers"),
    (["--split", "train"], "cannot be the split evaluated"),
])
def test_bad_settings_are_errors_before_the_model_loads(arguments, message, rt_data, tmp_path, capsys):
    assert icl(["--model", str(tmp_path / "no-such-model"), *arguments], rt_data, tmp_path / "run") == 2
    assert message in capsys.readouterr().err


def test_verbalizers_that_tokenise_to_nothing_are_errors(tiny_model_dir, rt_data, tmp_path, capsys, monkeypatch):
    from tokenizers import Tokenizer, normalizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_file(str(Path(tiny_model_dir) / "tokenizer.json"))
    backend.normalizer = normalizers.Replace("~", "")  # a tokenizer that drops '~'
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    monkeypatch.setattr(command, "load_tokenizer", lambda name: tokenizer)
    assert icl(["--model", tiny_model_dir, "--verbalizers", "~~,yes"], rt_data, tmp_path / "run") == 2
    assert "'~~' tokenises to nothing" in capsys.readouterr().err


def test_cola_scores_mcc(tiny_model_dir, tmp_path):
    data = write_cola(tmp_path / "data")
    assert main(["icl", "--task", "cola", "--model", tiny_model_dir, "--data-dir", data, "--shots", "0,1",
                 "--demo-seeds", "1", "--balanced", "--limit", "8", "--output-dir", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["metrics"] == ["mcc", "accuracy"] and results["verbalizers"] == ["no", "yes"]
    assert "MCC" in (tmp_path / "run" / "results.md").read_text()


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory, gpt2_tokenizer):
    """The tiny GPT-2 reading 512 tokens (chain-of-thought prompts are long)."""
    directory = tmp_path_factory.mktemp("tiny-gpt2-512")
    tiny_gpt2(seed=0, n_positions=512).save_pretrained(directory)
    gpt2_tokenizer.save_pretrained(directory)
    return str(directory)


def test_squad_generates_answers_scored_by_em_and_f1(tiny_model_dir, tmp_path, capsys):
    from test_qa import colour_paragraphs, write_squad

    from peftlab.tasks.metrics import f1_score

    data = write_squad(tmp_path / "data", colour_paragraphs(6), colour_paragraphs(4, offset=3))
    arguments = ["icl", "--task", "squad", "--model", tiny_model_dir, "--data-dir", data, "--demo-seeds", "1",
                 "--max-new-tokens", "3"]
    assert main(arguments + ["--shots", "0,1", "--output-dir", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["metrics"] == ["f1", "exact_match"] and results["examples"] == 4
    records = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    references = {e.origin: e.references for e in evaluation.read_examples("squad", "validation", data, None)}
    for record in records:
        assert record["f1"] == pytest.approx(100 * f1_score(record["generated"], references[record["origin"]]))
    one_shot = next(s for s in results["sets"] if s["shots"] == 1)
    assert one_shot["metrics"]["generate"]["f1"] == pytest.approx(
        sum(r["f1"] for r in records if r["shots"] == 1) / 4)
    # Four demonstrations with room for 3 new tokens do not fit 64 positions.
    assert main(arguments + ["--shots", "4", "--output-dir", str(tmp_path / "too-long")]) == 2
    assert "or lower --max-new-tokens" in capsys.readouterr().err


def test_chain_of_thought_prompts_and_answer_extraction(gpt2_tokenizer):
    problems = templates.read_problems(str(COT_FILE))
    assert len(problems) == 30
    prompt_format = resolve_format("cot", None, None, 0, chat=False)
    demonstration = IclExample({"text": problems[0].input}, templates.demonstration_answer(problems[0], "rationale"),
                               -1, (problems[0].answer,), problems[0].origin)
    text = PromptBuilder(prompt_format, gpt2_tokenizer, chat=False).text([demonstration], {"text": "How many?"})
    assert text == (f"Q: {problems[0].input}\nA: {problems[0].rationale} The answer is 72.\n\nQ: How many?\nA:")
    zero_shot = PromptBuilder(prompt_format, gpt2_tokenizer, chat=False, trigger=templates.ZERO_SHOT_TRIGGER)
    assert zero_shot.text([], {"text": "How many?"}) == "Q: How many?\nA: Let's think step by step."
    assert templates.demonstration_answer(problems[0], "answer") == "The answer is 72."
    assert templates.extracted_answer("3 * 4 = 12. The answer is $1,200. So") == "$1,200"
    assert templates.extracted_answer("twelve") is None
    assert templates.same_answer("$1,200", "1200") and templates.same_answer("72 loaves", "72")
    assert not templates.same_answer("71", "72") and not templates.same_answer(None, "72")


@pytest.mark.parametrize("reasoning, shots", [("rationale", "0,2"), ("zero-shot", "0")])
def test_chain_of_thought_runs_score_extracted_answers(reasoning, shots, long_model_dir, tmp_path):
    assert main(["icl", "--task", "cot", "--model", long_model_dir, "--demonstrations", str(COT_FILE), "--shots",
                 shots, "--reasoning", reasoning, "--demo-seeds", "1", "--limit", "3", "--max-new-tokens", "4",
                 "--output-dir", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["examples"] == 3 and results["trigger"] == ("Let's think step by step." if shots == "0" and
                                                                reasoning == "zero-shot" else "")
    records = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert all(r["correct"] == templates.same_answer(r["answer"], r["reference"]) for r in records)
    if reasoning == "zero-shot":  # the answer comes from a second step: the reasoning, then "The answer is"
        assert all(r["answer_step"].startswith("The answer is") for r in records)
        assert [r["answer"] for r in records] == [templates.extracted_answer(r["answer_step"]) for r in records]
    else:
        assert [r["answer"] for r in records] == [templates.extracted_answer(r["generated"]) for r in records]
    assert all(r["origin"].split(":")[-1] not in map(str, range(1, 9)) for r in records)  # never a pool problem
    for item in results["sets"]:
        correct = [r["correct"] for r in records if r["shots"] == item["shots"]]
        assert item["metrics"]["generate"]["accuracy"] == pytest.approx(sum(correct) / 3)


@pytest.mark.parametrize("lines, arguments, message", [
    (['{"input": "q", "rationale": "r", "answer": "1"}', '{"input": "q", "answer": "2"}'], [],
     "problems.jsonl:2: missing or empty rationale"),
    (['{"input": "q", "rationale": "r", "answer": "1"}', "not json"], [], "problems.jsonl:2: not a JSON object"),
    (['{"input": "q", "rationale": "r", "answer": "1"}'], ["--reasoning", "zero-shot", "--shots", "0,1"],
     "give --shots 0"),
])
def test_bad_demonstration_files_name_file_and_line(lines, arguments, message, tiny_model_dir, tmp_path, capsys):
    (tmp_path / "problems.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["icl", "--task", "cot", "--model", tiny_model_dir, "--demonstrations", str(tmp_path / "problems.jsonl"),
                 "--output-dir", str(tmp_path / "run"), *arguments]) == 2
    assert message in capsys.readouterr().err


def test_chat_prompts_are_turns_of_the_tokenizers_chat_template(gpt2_tokenizer, tiny_model_dir, rt_data, tmp_path,
                                                                capsys):
    tokenizer = copy.deepcopy(gpt2_tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n"
                               "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    prompt_format = resolve_format("rotten_tomatoes", "review", None, 2, chat=True)
    builder = PromptBuilder(prompt_format, tokenizer, chat=True)
    demonstrations = examples(SENTENCES[:1], [1], prompt_format.verbalizers)
    assert builder.text(demonstrations, {"text": "story"}) == (
        f"<user>Review: {SENTENCES[0]}\nSentiment:</user>\n<assistant>positive</assistant>\n"
        "<user>Review: story\nSentiment:</user>\n<assistant>")
    assert prompt_format.delimiter == "" and builder.answer_tokens("no") == tokenizer("no")["input_ids"]
    assert icl(["--model", tiny_model_dir, "--chat"], rt_data, tmp_path / "run") == 2
    assert "has no chat template" in capsys.readouterr().err
