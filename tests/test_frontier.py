"""`peftlab frontier`: one policy's measurement (`evaluate_policy`) on a tiny LoRA model with a stand-in reward, the
best-of-N estimator and bound by hand, the files it writes, their HTML page, and the refusals of the command line."""

import itertools
import json
import math
import statistics
from contextlib import nullcontext

import pytest
import torch
from test_dpo import write_preferences
from test_preferences_command import reward_run, rt_data  # noqa: F401 (fixtures)
from tiny_models import tiny_gpt2

import peftlab
from peftlab.cli import main
from peftlab.commands.frontier import (best_of_kl_bound, evaluate_policy, expected_best_of, frontier_table,
                                       reference_points, shared_reference, write_frontier)
from peftlab.commands.preferences import review_prompts, reward_scores
from peftlab.errors import PeftlabError
from peftlab.models import convert_conv1d_to_linear
from peftlab.models import load_tokenizer as peftlab_tokenizer
from peftlab.peft.base import adapter_parameters, disable_adapters
from peftlab.peft.prepare import apply_method
from peftlab.report.html import write_html_report
from peftlab.sampling import Sampling
from peftlab.workloads.dpo.kl import sequence_kl

PROMPTS = ["A film", "The plot of this movie is", "Bad"]


def stand_in_reward(texts):
    """A reward that depends on the whole text: the share of its characters that are vowels."""
    return [sum(char in "aeiou" for char in text) / max(len(text), 1) for text in texts]


@pytest.fixture(scope="module")
def policy():
    model = tiny_gpt2(seed=0)
    convert_conv1d_to_linear(model)
    apply_method(model, {"method": "lora", "targets": ["q", "v"], "rank": 2, "alpha": 8})
    generator = torch.Generator().manual_seed(3)
    for parameter in adapter_parameters(model):
        parameter.data = torch.randn(parameter.shape, generator=generator) * 0.5
    return model.eval()


def evaluate(model, tokenizer, reference, samples=3, batch_size=4):
    sampling = Sampling(temperature=1.0, top_k=0, top_p=1.0, seed=5, max_new_tokens=6)
    return evaluate_policy(model, tokenizer, PROMPTS, stand_in_reward, sampling, samples, reference, batch_size)


def test_a_policy_is_sampled_scored_and_measured_per_completion_and_summarised_over_prompts(policy, gpt2_tokenizer):
    result = evaluate(policy, gpt2_tokenizer, lambda: disable_adapters(policy))
    records = result["records"]
    assert [record["prompt"] for record in records] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for record in records:
        prompt = PROMPTS[record["prompt"]]
        assert record["completion"] == gpt2_tokenizer.decode(record["completion_ids"], skip_special_tokens=True)
        assert record["reward"] == stand_in_reward([prompt + record["completion"]])[0]
        # The batch's KL is each completion's own, measured alone.
        alone = sequence_kl(policy, lambda: disable_adapters(policy),
                            [gpt2_tokenizer(prompt, add_special_tokens=False)["input_ids"]], [record["completion_ids"]],
                            gpt2_tokenizer.pad_token_id)
        assert record["kl"] == pytest.approx(float(alone.kl[0]), abs=1e-4)
        assert record["log_ratio"] == pytest.approx(float(alone.log_ratio[0]), abs=1e-4)
        assert record["kl"] > 0
    per_prompt = [statistics.fmean(r["reward"] for r in records if r["prompt"] == index) for index in range(3)]
    assert result["reward_mean"] == pytest.approx(statistics.fmean(per_prompt))
    assert result["reward_std"] == pytest.approx(statistics.stdev(per_prompt))
    assert (result["prompts"], result["samples"]) == (3, 9)
    # The same seed and batch size draw the same completions.
    again = evaluate(policy, gpt2_tokenizer, lambda: disable_adapters(policy))
    assert [r["completion_ids"] for r in again["records"]] == [r["completion_ids"] for r in records]


def test_the_reference_itself_has_no_kl_to_measure(policy, gpt2_tokenizer):
    with disable_adapters(policy):
        result = evaluate(policy, gpt2_tokenizer, None)
    assert {record["kl"] for record in result["records"]} == {0.0} and result["kl_mean"] == 0.0
    measured = evaluate(policy, gpt2_tokenizer, nullcontext)  # the policy against itself: measured, also 0
    assert {record["kl"] for record in measured["records"]} == {0.0}


def test_best_of_n_is_the_mean_best_over_every_n_subset_of_the_samples():
    rewards = [0.3, 0.9, 0.1, 0.9, 0.5, 0.2]
    for n in range(1, 7):
        subsets = list(itertools.combinations(rewards, n))
        assert expected_best_of(rewards, n) == pytest.approx(sum(map(max, subsets)) / len(subsets))
    assert expected_best_of(rewards, 1) == pytest.approx(statistics.fmean(rewards))
    with pytest.raises(ValueError):
        expected_best_of(rewards, 7)


def test_the_best_of_n_kl_bound_is_log_n_minus_n_minus_one_over_n():
    assert [round(best_of_kl_bound(n), 5) for n in (2, 4, 8)] == [0.19315, 0.63629, 1.20444]


def fake_result(rewards_by_prompt):
    records = [{"prompt": p, "completion": "x", "completion_ids": [1], "tokens": 1, "reward": r, "kl": 0.0,
                "log_ratio": 0.0} for p, rewards in enumerate(rewards_by_prompt) for r in rewards]
    per_prompt = [statistics.fmean(rewards) for rewards in rewards_by_prompt]
    return {"prompts": len(rewards_by_prompt), "samples": len(records), "tokens_mean": 1.0,
            "reward_mean": statistics.fmean(per_prompt), "reward_std": statistics.stdev(per_prompt), "kl_mean": 0.0,
            "kl_std": 0.0, "log_ratio_mean": 0.0, "log_ratio_std": 0.0, "records": records}


def test_reference_points_are_the_reference_and_best_of_n_from_its_samples():
    result = fake_result([[0.1, 0.5, 0.9, 0.3], [0.2, 0.2, 0.8, 0.6]])
    reference, best2, best4 = reference_points(result, "sft", [2, 4])
    assert (reference["policy"], reference["kind"], reference["kl_mean"]) == ("sft", "reference", 0.0)
    assert reference["reward_mean"] == pytest.approx(0.45)
    # Best of 2 of [.1 .3 .5 .9]: (0.3 + 2*0.5 + 3*0.9) / 6; of [.2 .2 .6 .8]: (0.2 + 2*0.6 + 3*0.8) / 6.
    first, second = (0.3 + 1.0 + 2.7) / 6, (0.2 + 1.2 + 2.4) / 6
    assert best2["reward_mean"] == pytest.approx((first + second) / 2)
    assert best2["reward_std"] == pytest.approx(statistics.stdev([first, second]))
    assert best2["kl_mean"] == pytest.approx(math.log(2) - 0.5) and "bound" in best2["kl_is"]
    assert best4["reward_mean"] == pytest.approx((0.9 + 0.8) / 2)


def frontier_results():
    points = reference_points(fake_result([[0.1, 0.5, 0.9, 0.3], [0.2, 0.2, 0.8, 0.6]]), "sft", [2, 4])
    for name, beta, steps, reward, kl in (("b0.1", 0.1, 40, 0.7, 2.5), ("b0.5", 0.5, 40, 0.6, 0.8)):
        points.append({"policy": name, "kind": "dpo", "beta": beta, "steps": steps, "prompts": 2, "samples": 8,
                       "reward_mean": reward, "reward_std": 0.1, "kl_mean": kl, "kl_std": 0.4, "kl_is": "measured"})
    return {"kind": "frontier", "command": "peftlab frontier --reward rt --runs b0.1 b0.5 --output-dir f",
            "reward_run": "rt", "reference": "runs/sft/checkpoints/best", "split": "test", "prompts": 2,
            "sampling": {"temperature": 1.0}, "points": points}


def test_the_frontier_files_are_written_whole_and_an_existing_folder_needs_overwrite(tmp_path):
    results = frontier_results()
    target = tmp_path / "frontier"
    write_frontier(target, results, [{"policy": "sft", "reward": 0.5}], overwrite=False)
    assert sorted(path.name for path in target.iterdir()) == ["frontier.json", "frontier.md", "frontier.png",
                                                              "samples.jsonl"]
    assert json.loads((target / "frontier.json").read_text())["points"][-1]["policy"] == "b0.5"
    assert (target / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (target / "frontier.md").read_text()
    assert "| b0.1 | 0.1 | 40 | 0.7000 ± 0.1000 | 2.500 ± 0.400 | 8 |" in table
    assert "| best-of-2 | — | — |" in table and "≤ 0.193 (bound)" in table
    assert "| sft | — | — | 0.4500" in table
    assert results["command"] in table
    with pytest.raises(PeftlabError, match="exists"):
        write_frontier(target, results, [], overwrite=False)
    results["points"] = results["points"][:3]
    write_frontier(target, results, [], overwrite=True)
    assert "| b0.1 |" not in (target / "frontier.md").read_text()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(PeftlabError, match="not written by peftlab"):
        write_frontier(foreign, results, [], overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_the_html_report_of_a_frontier_folder_shows_its_table_and_plot(tmp_path):
    results = frontier_results()
    write_frontier(tmp_path / "frontier", results, [], overwrite=False)
    page = write_html_report([str(tmp_path / "frontier")], tmp_path / "page.html").read_text()
    assert "<td>b0.5</td>" in page and "2.500 ± 0.400" in page
    assert "alt='frontier.png'" in page and "data:image/png;base64," in page
    assert frontier_table(results).splitlines()[0].lstrip("# ") in page


@pytest.mark.parametrize("options, message", [
    (["--top-k", "50"], "full next-token distributions"),
    (["--temperature", "0"], "greedy"),
    (["--best-of", "1,4"], "--best-of 1,4"),
    (["--samples", "0"], "--samples must be >= 1"),
    (["--runs", "nowhere"], "neither a run directory (config.yaml) nor a folder of runs"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, options, message):
    arguments = ["frontier", "--reward", "rt", "--runs", str(tmp_path), "--output-dir", str(tmp_path / "out")]
    assert main(arguments + options) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_an_existing_output_folder_is_refused_before_anything_loads(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "frontier.json").write_text("{}")
    assert main(["frontier", "--reward", "rt", "--runs", "r", "--output-dir", str(tmp_path / "out")]) == 2
    assert "add --overwrite" in capsys.readouterr().err


def test_peftlab_frontier_end_to_end_on_tiny_dpo_runs(tiny_model_dir, reward_run, rt_data, tmp_path,  # noqa: F811
                                                      capsys):
    runs = []
    for beta in ("0.1", "0.5"):
        runs.append(str(tmp_path / "sweep" / f"dpo-{beta}"))
        assert main(["train", "--task", "preferences", "--preferences", write_preferences(tmp_path / "p.jsonl"),
                     "--model", tiny_model_dir, "--device", "cpu", "--output-dir", runs[-1], "--rank", "4",
                     "--lora-dropout", "0", "--batch-size", "1", "--epochs", "1", "--lr", "2e-2", "--warmup-ratio",
                     "0", "--beta", beta]) == 0
    output = tmp_path / "frontier"
    arguments = ["frontier", "--reward", reward_run, "--runs", str(tmp_path / "sweep"), "--output-dir", str(output),
                 "--data-dir", rt_data, "--prompts", "3", "--samples", "2", "--best-of", "2,4", "--max-new-tokens", "4",
                 "--device", "cpu"]
    capsys.readouterr()
    assert main(arguments) == 0
    assert "| dpo-0.5 | 0.5 | 2 |" in capsys.readouterr().out  # the closing summary is the table
    results = json.loads((output / "frontier.json").read_text())
    assert [(p["policy"], p["kind"], p.get("beta")) for p in results["points"]] == [
        (f"reference: {tiny_model_dir} with the adapter disabled", "reference", None), ("best-of-2", "best-of-n", None),
        ("best-of-4", "best-of-n", None), ("dpo-0.1", "dpo", 0.1), ("dpo-0.5", "dpo", 0.5)]
    samples = [json.loads(line) for line in (output / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 4 + 2 * 3 * 2  # the reference samples best-of-4's four per prompt
    reference = [s for s in samples if s["policy"] == "reference"]
    assert results["points"][0]["reward_mean"] == pytest.approx(statistics.fmean(s["reward"] for s in reference))
    prompts = review_prompts(peftlab_tokenizer(tiny_model_dir), "test", 3, 0, rt_data)
    assert reward_scores(peftlab.load_run(reward_run), [prompts[reference[0]["prompt"]] + reference[0]["completion"]]
                         ) == pytest.approx([reference[0]["reward"]])
    for point in results["points"][3:]:
        assert point["kl_mean"] > 0 and point["samples"] == 6
    assert results["runs"] == runs  # the sweep folder's runs
    assert main(arguments) == 2  # the folder exists now
    assert main(arguments + ["--overwrite"]) == 0
    # The base model given as --reference is the runs' reference (their adapter disabled): the same samples.
    arguments[arguments.index(str(output))] = str(tmp_path / "given")
    assert main(arguments + ["--reference", tiny_model_dir]) == 0
    given = json.loads((tmp_path / "given" / "frontier.json").read_text())["points"]
    assert given[0]["policy"] == tiny_model_dir
    assert [p["reward_mean"] for p in given] == pytest.approx([p["reward_mean"] for p in results["points"]])


def test_runs_on_different_references_need_one_given():
    class Run:
        def __init__(self, model, reference):
            self.config = type("Config", (), {"model": type("Model", (), {"name": model})})
            self.reference = reference

    shared_reference([Run("m", "sft/checkpoints/best"), Run("m", "sft/checkpoints/best")], None)
    with pytest.raises(PeftlabError, match="different references"):
        shared_reference([Run("m", "sft/checkpoints/best"), Run("m", "m with the adapter disabled")], None)
    shared_reference([Run("m", "sft/checkpoints/best"), Run("m", "m with the adapter disabled")], "m")
    with pytest.raises(PeftlabError, match="different models"):
        shared_reference([Run("m", "r"), Run("n", "r")], "m")
