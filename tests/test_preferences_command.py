"""`peftlab preferences`: the review prompts, the pairing rules by hand, the reward against the reward run's own
evaluation, reproducible sampling, and the refusals (an existing output, a reward run that is not Rotten Tomatoes'
with a positive label)."""

import json

import pytest
from test_instruct import instruct_config
from test_train import tiny_config
from tiny_data import write_cola, write_rotten_tomatoes

import peftlab
from peftlab import PeftlabError
from peftlab.cli import main
from peftlab.commands.preferences import preference_pairs, review_prompts, reward_scores
from peftlab.generate import Completion
from peftlab.data.rotten_tomatoes import read_rotten_tomatoes
from peftlab.train import evaluate_run, train


@pytest.fixture(scope="module")
def rt_data(tmp_path_factory):
    return write_rotten_tomatoes(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reward_run(tiny_model_dir, rt_data, tmp_path_factory):
    """A tiny GPT-2 LoRA classifier of Rotten Tomatoes, two steps: scores are far from trained, but they are its own."""
    config = tiny_config(tiny_model_dir, rt_data, tmp_path_factory.mktemp("reward") / "run", epochs=1, max_steps=2)
    config.task.name, config.task.objective = "rotten_tomatoes", "classification"
    config.task.train_limit, config.task.eval_limit, config.task.test_limit = 32, 16, 8
    train(config)
    return config.output_dir


@pytest.fixture(scope="module")
def instruct_reward_run(tiny_model_dir, rt_data, tmp_path_factory):
    """A tiny GPT-2 instruction-tuned on Rotten Tomatoes: its reward is the verbaliser probability of "positive"."""
    config = instruct_config(tiny_model_dir, rt_data, tmp_path_factory.mktemp("instruct") / "run", train_limit=32,
                             eval_limit=8, test_limit=8, predict="score")
    config.train.epochs, config.train.max_steps = 1, 2
    train(config)
    return config.output_dir


@pytest.fixture(scope="module")
def cola_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cola")
    config = tiny_config(tiny_model_dir, write_cola(root / "data", train_rows=32, dev_rows=8), root / "run", epochs=1,
                         max_steps=1)
    train(config)
    return config.output_dir


def test_prompts_are_the_first_two_to_eight_tokens_of_seeded_reviews(gpt2_tokenizer, rt_data):
    prompts = review_prompts(gpt2_tokenizer, "train", 40, seed=3, data_dir=rt_data)
    reviews = [example.text for example in read_rotten_tomatoes("train", rt_data)]
    assert len(prompts) == 40
    for prompt in prompts:
        assert 2 <= len(gpt2_tokenizer(prompt)["input_ids"]) <= 8
        assert any(review.startswith(prompt) for review in reviews)
    lengths = {len(gpt2_tokenizer(prompt)["input_ids"]) for prompt in prompts}
    assert len(lengths) >= 4  # drawn, not fixed
    assert review_prompts(gpt2_tokenizer, "train", 40, seed=3, data_dir=rt_data) == prompts
    assert review_prompts(gpt2_tokenizer, "train", 40, seed=4, data_dir=rt_data) != prompts
    with pytest.raises(PeftlabError, match="has 1066 reviews"):
        review_prompts(gpt2_tokenizer, "test", 2000, seed=0, data_dir=rt_data)


def samples(*texts, ended=True) -> list[Completion]:
    return [Completion(text, ended) for text in texts]


def test_pairs_keep_every_two_samples_with_different_rewards_the_higher_chosen():
    pairs = preference_pairs("p", samples(" a", " b", " c"), [0.1, 0.5, 0.5])
    assert [(pair["chosen"], pair["rejected"]) for pair in pairs] == [(" b", " a"), (" c", " a")]
    assert [(pair["chosen_score"], pair["rejected_score"]) for pair in pairs] == [(0.5, 0.1), (0.5, 0.1)]
    assert all(pair["prompt"] == "p" for pair in pairs)
    # Identical completions are never a pair, even when their scores differ (padding in another batch).
    pairs = preference_pairs("p", samples(" x", " x", " y"), [0.3, 0.2, 0.9])
    assert [(pair["chosen"], pair["rejected"], pair["rejected_score"]) for pair in pairs] == [(" y", " x", 0.3),
                                                                                              (" y", " x", 0.2)]
    assert preference_pairs("p", samples(" a", " b"), [0.4, 0.4]) == []


def test_a_completion_cut_before_eos_is_marked_truncated_on_its_side():
    cut, ended = Completion(" went on and on", False), Completion(" was fine.", True)
    first, second = preference_pairs("p", [cut, ended], [0.9, 0.2]), preference_pairs("p", [cut, ended], [0.2, 0.9])
    assert (first[0]["chosen_truncated"], first[0]["rejected_truncated"]) == (True, False)
    assert (second[0]["chosen_truncated"], second[0]["rejected_truncated"]) == (False, True)


@pytest.mark.parametrize("kind", ["classifier", "instruct"])
def test_the_reward_is_the_reward_runs_probability_of_positive_as_its_evaluation_computes(kind, request, tmp_path):
    reward_run = request.getfixturevalue("reward_run" if kind == "classifier" else "instruct_reward_run")
    predictions = tmp_path / "eval.jsonl"
    evaluate_run(reward_run, "validation", limit=16, predictions_file=str(predictions))
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert records[0]["label_names"] == ["negative", "positive"]
    scores = reward_scores(peftlab.load_run(reward_run), [record["input"] for record in records], batch_size=5)
    assert scores == pytest.approx([record["probabilities"][1] for record in records], abs=1e-5)


def preferences(policy, reward, output, data, *extra):
    return main(["preferences", "--policy", policy, "--reward", reward, "--output", str(output), "--data-dir", data,
                 "--prompts", "6", "--samples", "3", "--max-new-tokens", "6", "--batch-size", "4", *extra])


def test_sampling_is_reproducible_and_every_pair_is_scored_by_the_reward(tiny_model_dir, reward_run, rt_data,
                                                                          tmp_path, capsys):
    first, again, other = tmp_path / "first.jsonl", tmp_path / "again.jsonl", tmp_path / "other.jsonl"
    assert preferences(tiny_model_dir, reward_run, first, rt_data, "--seed", "5") == 0
    summary = capsys.readouterr().out
    assert preferences(tiny_model_dir, reward_run, again, rt_data, "--seed", "5") == 0
    assert preferences(tiny_model_dir, reward_run, other, rt_data, "--seed", "6") == 0
    pairs = [json.loads(line) for line in first.read_text().splitlines()]
    assert first.read_text() == again.read_text() and first.read_text() != other.read_text()
    assert pairs and f"{len(pairs)} pairs from 6 prompts x 3 samples" in summary and "reward mean" in summary
    prompts = set(review_prompts(peftlab.load_run(reward_run).task.tokenizer, "train", 6, 5, rt_data))
    reward = peftlab.load_run(reward_run)
    for pair in pairs:
        assert set(pair) == {"prompt", "chosen", "rejected", "chosen_score", "rejected_score", "chosen_truncated",
                             "rejected_truncated"}
        assert isinstance(pair["chosen_truncated"], bool) and isinstance(pair["rejected_truncated"], bool)
        assert pair["prompt"] in prompts and pair["chosen"] != pair["rejected"] and pair["chosen"].strip()
        assert pair["chosen_score"] > pair["rejected_score"]
        rescored = reward_scores(reward, [pair["prompt"] + pair["chosen"], pair["prompt"] + pair["rejected"]])
        assert rescored == pytest.approx([pair["chosen_score"], pair["rejected_score"]], abs=1e-5)
    assert len(pairs) <= 6 * 3  # at most three pairs of three samples per prompt


def test_an_existing_output_and_a_reward_run_without_a_positive_label_are_refused(tiny_model_dir, reward_run, cola_run,
                                                                                 rt_data, tmp_path, capsys):
    output = tmp_path / "pairs.jsonl"
    output.write_text("kept\n")
    assert preferences(tiny_model_dir, reward_run, output, rt_data) == 2
    error = capsys.readouterr().err
    assert "exists; nothing was written" in error and "--overwrite" in error and output.read_text() == "kept\n"
    fresh = tmp_path / "fresh.jsonl"
    assert preferences(tiny_model_dir, cola_run, fresh, rt_data) == 2
    error = capsys.readouterr().err
    assert f"--reward {cola_run}: a cola run" in error and len(error.strip().splitlines()) == 1
    assert not fresh.exists()
    assert preferences(tiny_model_dir, reward_run, output, rt_data, "--overwrite") == 0
    assert output.read_text() != "kept\n"


def test_a_trained_lm_run_is_a_policy_with_its_adapter_on(tiny_model_dir, reward_run, cola_run, rt_data, tmp_path,
                                                          capsys):
    run = tmp_path / "sft"
    assert main(["train", "--task", "rotten_tomatoes", "--objective", "lm", "--method", "lora", "--model",
                 tiny_model_dir, "--data-dir", rt_data, "--device", "cpu", "--max-steps", "2", "--batch-size", "4",
                 "--train-limit", "16", "--eval-limit", "4", "--test-limit", "4", "--lr", "0.05",
                 "--output-dir", str(run)]) == 0
    from_run, from_base = tmp_path / "run.jsonl", tmp_path / "base.jsonl"
    assert preferences(str(run), reward_run, from_run, rt_data, "--seed", "5") == 0
    assert preferences(tiny_model_dir, reward_run, from_base, rt_data, "--seed", "5") == 0
    assert from_run.read_text() and from_run.read_text() != from_base.read_text()  # the adapter changes the samples
    capsys.readouterr()
    assert preferences(cola_run, reward_run, tmp_path / "no.jsonl", rt_data) == 2
    assert f"--policy {cola_run}: a classification run" in capsys.readouterr().err
