"""Instruction tuning (W3): Rotten Tomatoes reader and split, templates, label masking, the causal-LM loss,
greedy generation, verbalizer scoring, label parsing, training/evaluation end to end, sweeps and reports."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from peftlab import PeftlabError
from peftlab.cli import main
from tiny_data import write_rotten_tomatoes  # noqa: F401  (other tests import it from here)
from peftlab.config import RunConfig
from peftlab.workloads.instruct import InstructConfig
from peftlab.data.rotten_tomatoes import read_rotten_tomatoes
from peftlab.workloads.loading import get_task
from peftlab.generation import decode
from peftlab.tasks.completion import IGNORE, score_choices
from peftlab.workloads.instruct.templates import resolve_template
from peftlab.workloads.instruct.workload import UNPARSABLE, parse_label
from peftlab.train import evaluate_run, train

def instruct_config(model_dir, data_dir, output_dir, **task_overrides) -> RunConfig:
    config = RunConfig(output_dir=str(output_dir))
    config.model.name = model_dir
    config.task.name, config.task.data_dir = "rotten_tomatoes", data_dir
    config.task.train_limit, config.task.eval_limit = 256, 64
    config.adapter.targets, config.adapter.rank, config.adapter.alpha = ["all-linear"], 4, 8
    config.train.epochs, config.train.batch_size, config.train.lr, config.train.device = 2, 16, 3e-3, "cpu"
    config.instruct = InstructConfig()
    for key, value in task_overrides.items():
        setattr(config.instruct if key in ("template", "verbalizers", "predict") else config.task, key, value)
    return config


@pytest.fixture(scope="module")
def rt_data(tmp_path_factory):
    return write_rotten_tomatoes(tmp_path_factory.mktemp("data"))


# --- data -------------------------------------------------------------------------------------------------


def test_split_is_balanced_disjoint_deterministic_and_complete(rt_data):
    splits = {name: read_rotten_tomatoes(name, rt_data) for name in ("train", "validation", "test")}
    assert {name: len(examples) for name, examples in splits.items()} == {"train": 8530, "validation": 1066, "test": 1066}
    for examples in splits.values():
        assert sum(example.label for example in examples) == len(examples) // 2
    origins = [example.origin for examples in splits.values() for example in examples]
    assert len(set(origins)) == 10662  # every line once, in exactly one split
    assert read_rotten_tomatoes("test", rt_data) == splits["test"]
    positive = next(example for example in splits["train"] if example.label == 1)
    assert positive.text.endswith("great .") and positive.origin.split(":")[0].endswith("rt-polarity.pos")


def test_cp1252_punctuation_is_decoded_and_bad_files_are_errors(tmp_path):
    data = write_rotten_tomatoes(tmp_path, lines_per_class=5331)
    path = tmp_path / "rotten_tomatoes" / "rt-polarity.pos"
    lines = path.read_bytes().splitlines()
    lines[0] = b"an ending \x85 that \x96 works"
    path.write_bytes(b"\n".join(lines) + b"\n")
    texts = [example.text for split in ("train", "validation", "test") for example in read_rotten_tomatoes(split, data)]
    assert "an ending \u2026 that \u2013 works" in texts
    lines[5] = b"   "
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(PeftlabError, match=r"rt-polarity.pos:6: empty line"):
        read_rotten_tomatoes("train", data)
    path.write_bytes(b"\n".join(lines[6:106]) + b"\n")
    with pytest.raises(PeftlabError, match="needs 5331 per class"):
        read_rotten_tomatoes("train", data)
    with pytest.raises(PeftlabError, match="unknown Rotten Tomatoes split 'dev'"):
        read_rotten_tomatoes("dev", data)


# --- templates and parsing --------------------------------------------------------------------------------


def test_templates_by_name_or_format_string():
    assert resolve_template("rotten_tomatoes", "") == "Review: {text}\nSentiment:"
    assert resolve_template("rotten_tomatoes", "question").startswith("Is the sentiment")
    assert resolve_template("rotten_tomatoes", "Text: {text}\\nMood:") == "Text: {text}\nMood:"
    with pytest.raises(PeftlabError, match="neither a template name"):
        resolve_template("rotten_tomatoes", "no placeholder")
    with pytest.raises(PeftlabError, match="neither a template name"):
        resolve_template("rotten_tomatoes", "{text} and {other}")


@pytest.mark.parametrize("text, expected", [
    (" positive", 1), ("Negative.", 0), ("\n  POSITIVE review", 1), ("positively", UNPARSABLE),
    ("neg", UNPARSABLE), ("", UNPARSABLE), ("it is positive", UNPARSABLE), ('"negative"', 0),
])
def test_generated_text_maps_to_a_label_or_unparsable(text, expected):
    assert parse_label(text, ("negative", "positive")) == expected


def test_the_longest_matching_verbalizer_wins():
    assert parse_label("not sure", ("not", "not sure")) == 1
    assert parse_label("not really", ("not", "not sure")) == 0


def test_verbalizers_must_match_the_labels(gpt2_tokenizer, rt_data):
    config = RunConfig(sections={"instruct": InstructConfig(verbalizers=["bad"])})
    config.task.name, config.task.data_dir = "rotten_tomatoes", rt_data
    with pytest.raises(PeftlabError, match="1 verbalizers"):
        get_task(config, gpt2_tokenizer)
    config.instruct.verbalizers = ["good", "Good"]
    with pytest.raises(PeftlabError, match="distinct"):
        get_task(config, gpt2_tokenizer)


# --- encoding, masking, loss -------------------------------------------------------------------------------


def rt_task(tokenizer, data, **overrides):
    config = RunConfig(sections={"instruct": InstructConfig()})
    config.task.name, config.task.data_dir = "rotten_tomatoes", data
    for key, value in overrides.items():
        setattr(config.instruct if key in ("template", "verbalizers", "predict") else config.task, key, value)
    return get_task(config, tokenizer)


def test_examples_are_prompt_answer_eos_and_only_the_answer_is_learned(gpt2_tokenizer, rt_data):
    task = rt_task(gpt2_tokenizer, rt_data)
    examples = task.encode("validation")[:5]
    first = examples[0]
    text = gpt2_tokenizer.decode(first.input_ids)
    assert text.startswith("Review: ") and text.endswith("\nSentiment: positive<|endoftext|>")
    assert gpt2_tokenizer.decode(first.input_ids[: first.target.prompt_length]).endswith("Sentiment:")
    batch = task.collate(examples)
    width = batch["input_ids"].shape[1]
    for row, example in enumerate(examples):
        fed = example.length - 1  # the final EOS predicts nothing and is not fed
        pad = width - fed
        assert batch["input_ids"][row, pad:].tolist() == example.input_ids[:-1]
        assert batch["attention_mask"][row].tolist() == [0] * pad + [1] * fed  # left padding
        assert batch["position_ids"][row, pad:].tolist() == list(range(fed))
        # Each column holds the token it predicts: the completion's, from the prompt's last token on.
        targets = batch["targets"][row, pad:].tolist()
        assert targets == [IGNORE] * (example.target.prompt_length - 1) + example.input_ids[example.target.prompt_length :]
        learned = [token for token in targets if token != IGNORE]
        assert gpt2_tokenizer.decode(learned) in (" positive<|endoftext|>", " negative<|endoftext|>")
    everything = rt_task(gpt2_tokenizer, rt_data, loss_on="all").collate(examples)
    for row, example in enumerate(examples):
        assert everything["targets"][row][everything["targets"][row] != IGNORE].tolist() == example.input_ids[1:]


@pytest.mark.parametrize("loss_on", ["answer", "all"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batched_loss_and_gradients_equal_per_example_full_logits(family, loss_on, gpt2_tokenizer, rt_data,
                                                                make_tiny_gpt2, make_tiny_llama):
    """Left padding + position ids + logits only on the labelled columns == each example alone, all logits."""
    from peftlab.models import convert_conv1d_to_linear
    from peftlab.peft import apply_adapters

    model = make_tiny_gpt2() if family == "gpt2" else make_tiny_llama()
    convert_conv1d_to_linear(model)
    apply_adapters(model, ["all-linear"], rank=4, alpha=8)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_b" in name:
                parameter.normal_(std=0.1)  # B != 0: the adapters change the output
    model.train()  # un-merged LoRA, so gradients reach A and B; the base model's own dropout off:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    task = rt_task(gpt2_tokenizer, rt_data, loss_on=loss_on)
    examples = task.encode("validation")[::97][:6]
    output = task.forward(model, task.collate(examples))
    output.loss_sum.backward()
    batched_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    expected_loss, expected_targets = 0.0, 0
    for example in examples:
        ids = torch.tensor([example.input_ids])
        logits = model(input_ids=ids).logits[0, :-1]
        first = example.target.prompt_length if loss_on == "answer" else 1
        targets = ids[0, 1:].clone()
        targets[: first - 1] = IGNORE
        loss = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
        loss.backward()
        expected_loss += loss.item()
        expected_targets += int((targets != IGNORE).sum())
    assert output.num_targets == expected_targets
    assert output.loss_sum.item() == pytest.approx(expected_loss, rel=1e-5)
    for batched, single in zip(batched_grads, [p.grad for p in model.parameters() if p.requires_grad]):
        assert torch.isfinite(batched).all()
        torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)


# --- prediction --------------------------------------------------------------------------------------------


def test_greedy_generation_with_cache_equals_a_naive_argmax_loop(make_tiny_llama):
    model = make_tiny_llama()
    prompts = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15]]
    stop = {17}
    generated = decode(model, prompts, max_new_tokens=6, stop_ids=stop, pad_id=0)
    for prompt, tokens in zip(prompts, generated):
        sequence, expected = list(prompt), []
        for _ in range(6):
            with torch.no_grad():
                token = int(model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax())
            expected.append(token)
            sequence.append(token)
            if token in stop:
                break
        assert tokens == expected


def test_scoring_equals_hand_computed_log_likelihoods(make_tiny_llama):
    model = make_tiny_llama()
    prompts = [[5, 6, 7], [8, 9]]

    def by_hand(prompt, choice):
        with torch.no_grad():
            log_probs = model(input_ids=torch.tensor([prompt + choice])).logits[0].log_softmax(-1)
        return sum(float(log_probs[len(prompt) - 1 + i, token]) for i, token in enumerate(choice))

    for choices in ([[20], [30]], [[20, 21], [30], [40, 41, 42]]):
        scores = score_choices(model, prompts, choices, pad_id=0)
        expected = torch.tensor([[by_hand(p, c) for c in choices] for p in prompts])
        torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("verbalizers", ["positive,negative", "very good,quite bad"])  # 1 token each, or 2
def test_predict_both_equals_generate_and_score_apart_and_reuses_the_prefill(verbalizers, make_tiny_gpt2,
                                                                              gpt2_tokenizer, rt_data, monkeypatch):
    from peftlab.models import convert_conv1d_to_linear
    from peftlab.workloads.instruct import workload as instruct

    model = make_tiny_gpt2(seed=4)
    convert_conv1d_to_linear(model)
    task = rt_task(gpt2_tokenizer, rt_data, verbalizers=verbalizers.split(","))
    examples = task.encode("validation")[::61][:9]
    apart = {}
    for mode in ("generate", "score"):
        task.predict_mode = mode
        apart[mode] = task.predict(model, examples)
    task.predict_mode = "both"
    single_token = all(len(tokens) == 1 for tokens in task.answer_tokens)
    if single_token:  # the generation's first step already holds every answer's likelihood
        monkeypatch.setattr(instruct, "score_choices", lambda *args: pytest.fail("scored in a second pass"))
    both = task.predict(model, examples)
    assert both == [generated | scored for generated, scored in zip(apart["generate"], apart["score"])]
    assert len({result["score"] for result in both}) == 2  # both labels occur: the comparison is not vacuous


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_evaluation_generates_from_the_loss_pass_as_predict_does(family, make_tiny_gpt2, make_tiny_llama,
                                                                   gpt2_tokenizer, rt_data, monkeypatch, tmp_path):
    """Evaluating by generation continues every prompt from the loss pass's cache (no second pass over the
    prompts): the same labels and texts as `predict`, which computes the prompts again."""
    from peftlab.engine import evaluate
    from peftlab.models import convert_conv1d_to_linear
    from peftlab.workloads.instruct import workload as instruct

    model = (make_tiny_gpt2 if family == "gpt2" else make_tiny_llama)(seed=4, width=256)
    convert_conv1d_to_linear(model)
    task = rt_task(gpt2_tokenizer, rt_data, verbalizers=["very good", "quite bad"])  # 2-token answers
    examples = task.encode("validation")[::41][:12]
    expected = task.predict(model, examples)
    assert len({result["text"] for result in expected}) > 1  # the texts differ: the comparison is not vacuous
    monkeypatch.setattr(instruct.InstructTask, "predict", lambda *args: pytest.fail("prompts computed again"))
    predictions_file = tmp_path / "predictions.jsonl"
    metrics = evaluate(model, task, examples, batch_size=5, predictions_file=predictions_file)
    written = [json.loads(line)["prediction"] for line in predictions_file.read_text().splitlines()]
    assert written == expected
    assert metrics["accuracy"] == sum(result["generate"] == example.target.reference
                                      for result, example in zip(expected, examples)) / len(examples)


def test_metrics_count_unparsable_as_wrong_and_report_agreement(gpt2_tokenizer, rt_data):
    task = rt_task(gpt2_tokenizer, rt_data)
    examples = task.encode("validation")[530:536]  # 3 positive then 3 negative
    labels = [example.target.reference for example in examples]
    assert labels == [1, 1, 1, 0, 0, 0]
    predictions = [{"generate": 1, "score": 1}, {"generate": UNPARSABLE, "score": 1}, {"generate": 0, "score": 0},
                   {"generate": 0, "score": 0}, {"generate": 0, "score": 0}, {"generate": UNPARSABLE, "score": 0}]
    metrics = task.metrics(predictions, examples)
    assert metrics["accuracy"] == pytest.approx(3 / 6)
    assert metrics["unparsable"] == 2
    assert metrics["predicted_counts"] == {"negative": 3, "positive": 1}
    assert metrics["score_accuracy"] == pytest.approx(5 / 6)
    assert metrics["agreement"] == pytest.approx(4 / 6)


# --- end to end ---------------------------------------------------------------------------------------------


def test_the_end_of_training_test_honours_test_limit(tiny_model_dir, rt_data, tmp_path, capsys):
    config = instruct_config(tiny_model_dir, rt_data, tmp_path / "run", predict="score", train_limit=32,
                             eval_limit=16, test_limit=24)
    config.train.epochs = 1
    summary = train(config)
    assert summary["test"]["examples"] == 24
    assert "Test (test, 24 examples, best checkpoint of step 2)" in capsys.readouterr().out
    again = evaluate_run(str(tmp_path / "run"), split="test", limit=24)
    assert again["accuracy"] == pytest.approx(summary["test"]["accuracy"]) and again["loss"] == pytest.approx(
        summary["test"]["loss"], rel=1e-5)


def test_instruction_tuning_learns_and_reports_test_accuracy_of_the_best_checkpoint(tiny_model_dir, rt_data, tmp_path,
                                                                                    capsys):
    config = instruct_config(tiny_model_dir, rt_data, tmp_path / "run", predict="both")
    config.adapter.method = "full"  # the tiny random model needs its LM head trained to learn the words
    config.train.lr, config.train.epochs = 1e-2, 3
    summary = train(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert summary["test"]["split"] == "test" and summary["test"]["epoch"] == summary["best"]["epoch"]
    assert {"accuracy", "score_accuracy", "agreement", "unparsable"} <= set(summary["test"])
    assert summary["test"]["score_accuracy"] > 0.6  # chance is 0.5: "great" vs "awful" is being learnt
    again = evaluate_run(str(tmp_path / "run"), split="test", predict="score")
    assert again["accuracy"] == pytest.approx(summary["test"]["score_accuracy"])

    # `peftlab generate --model RUN_DIR` is the run's fine-tuned model: a review prompt gets a learnt label word,
    # which the untrained base model (same prompt, same greedy decoding) does not write. With --raw the prompt is
    # sent as written; without, the review alone is put into the run's template, which gives the same text.
    prompt = "Review: the film is great .\nSentiment:"
    arguments = ["generate", "--max-new-tokens", "2", "--temperature", "0"]
    assert main(arguments + ["--prompt", prompt, "--raw", "--model", str(tmp_path / "run")]) == 0
    tuned = capsys.readouterr().out.split("---\n", 1)[1]
    assert main(arguments + ["--prompt", "the film is great .", "--model", str(tmp_path / "run")]) == 0
    templated = capsys.readouterr().out.split("---\n", 1)[1]
    assert main(arguments + ["--prompt", prompt, "--model", tiny_model_dir]) == 0
    base = capsys.readouterr().out.split("---\n", 1)[1]
    assert tuned.startswith(prompt + " positive") and not base.startswith(prompt + " positive")
    assert templated.startswith(prompt + " positive")


def test_zero_shot_eval_from_the_command_line(tiny_model_dir, rt_data, capsys):
    code = main(["eval", "--task", "rotten_tomatoes", "--model", tiny_model_dir, "--data-dir", rt_data,
                 "--limit", "16", "--predict", "both", "--template", "Text: {text}\\nMood:"])
    assert code == 0
    out = capsys.readouterr().out
    assert "(no fine-tuning) validation (16 examples)" in out and "unparsable:" in out and "agreement:" in out


def test_sweep_trains_the_grid_skips_finished_runs_and_writes_table_and_plot(tiny_model_dir, rt_data, tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"output_dir: {tmp_path / 'sweep'}\n"
        f"base:\n  model: {{name: {tiny_model_dir}}}\n"
        f"  task: {{name: rotten_tomatoes, data_dir: {rt_data}, train_limit: 32, eval_limit: 16, predict: score}}\n"
        "  adapter: {targets: [all-linear]}\n"
        "  train: {epochs: 1, batch_size: 16, device: cpu}\n"
        "grid:\n  setting:\n    - {adapter.rank: 2, adapter.alpha: 8}\n    - {adapter.method: full, train.lr: 1.0e-4}\n"
    )
    assert main(["sweep", str(grid)]) == 0
    table = (tmp_path / "sweep" / "report.md").read_text()
    assert "| rank2-alpha8 | lora r2 α8 all-linear |" in table and "| methodfull-lr0.0001 | full |" in table
    assert "(test, accuracy)" in table
    # One evaluation per run: validation loss as two bars (7 x 2.3 in at 110 dpi); one panel with two points (7.5 x
    # 4.8 in, about 70 coloured pixels a point). Axes, text and grid are grey: the coloured pixels are the data.
    plots = {"val_loss.png": ((770, 253), 10_000), "score_vs_parameters.png": ((825, 528), 100)}
    for plot, (size, coloured) in plots.items():
        with Image.open(tmp_path / "sweep" / plot) as image:
            assert (image.format, image.size) == ("PNG", size), plot
            saturation = image.convert("RGB").convert("HSV").getchannel("S").histogram()
        assert sum(saturation[100:]) > coloured, plot
    capsys.readouterr()
    assert main(["sweep", str(grid)]) == 0
    assert capsys.readouterr().out.count("already done, skipped") == 2
    assert main(["report", str(tmp_path / "sweep" / "rank2-alpha8"), "--output-dir", str(tmp_path / "report")]) == 0
    assert "rank2-alpha8" in (tmp_path / "report" / "report.md").read_text()


def test_sweep_run_names_spell_out_each_point():
    from peftlab.commands.sweep import expand_grid

    names = [name for name, _ in expand_grid({"setting": [{"adapter.rank": 4, "adapter.alpha": 8},
                                                          {"adapter.targets": ["q", "k", "v", "o"]}],
                                              "train.lr": [1e-4]})]
    assert names == ["rank4-alpha8_lr0.0001", "targetsq+k+v+o_lr0.0001"]


def test_sweep_errors_name_the_problem(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("output_dir: x\ngrid:\n  adapter.rnak: [1, 2]\n")
    assert main(["sweep", str(grid)]) == 2
    grid.write_text("output_dir: x\ngrid:\n  rank: [1, 2]\n")
    assert main(["sweep", str(grid)]) == 2
    assert main(["sweep"]) == 2
