"""Settings: None means "the task's own" and is resolved when a run starts, so config.yaml records what the run
used and reproduces it; the command line is generated from the documented fields; old config files still load."""

import dataclasses

import pytest
import yaml
from test_train import read_rows, write_cola

from peftlab.cli import _build_parser, main
from peftlab.commands.run import train_config_from_args
from peftlab.options import train_options
from peftlab.workloads.distill.command_line import distill_options
from peftlab.config import RunConfig


def test_config_yaml_records_resolved_values_and_reproduces_the_run(tiny_model_dir, tmp_path):
    data = write_cola(tmp_path / "data", train_rows=32, dev_rows=8)
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["train", "--task", "cola", "--model", tiny_model_dir, "--data-dir", data, "--epochs", "2",
                 "--batch-size", "16", "--lr", "3e-3", "--device", "cpu", "--output-dir", str(first)]) == 0
    recorded = yaml.safe_load((first / "config.yaml").read_text())
    assert recorded["version"] == 2
    assert recorded["task"]["objective"] == "classification" and recorded["task"]["max_length"] == 128
    assert recorded["adapter"]["extra_trainable"] == ["head"] and recorded["train"]["select_metric"] == "mcc"
    assert main(["train", "--recipe", str(first / "config.yaml"), "--output-dir", str(second)]) == 0
    again = yaml.safe_load((second / "config.yaml").read_text())
    assert again | {"output_dir": None, "environment": None} == recorded | {"output_dir": None, "environment": None}
    # Where and how each run was started is recorded, not copied from the recipe.
    assert recorded["environment"]["command"].startswith("peftlab train --task cola --model ")
    assert again["environment"]["command"].startswith("peftlab train --recipe ")
    assert recorded["environment"]["torch"].startswith("2.13") and recorded["environment"]["device"] == "cpu"
    assert recorded["environment"]["precision"] == "fp32" and recorded["environment"]["transformers"]
    for row, reference in zip(read_rows(second), read_rows(first), strict=True):
        for key in ("train_loss", "val_loss", "val_mcc", "val_accuracy"):
            assert row[key] == pytest.approx(reference[key], abs=1e-9), key


def test_a_config_written_before_resolution_still_evaluates_the_same(tiny_model_dir, tmp_path, capsys):
    data = write_cola(tmp_path / "data", train_rows=32, dev_rows=8)
    run = tmp_path / "run"
    assert main(["train", "--task", "cola", "--model", tiny_model_dir, "--data-dir", data, "--epochs", "1",
                 "--batch-size", "16", "--device", "cpu", "--output-dir", str(run)]) == 0
    assert main(["eval", str(run)]) == 0
    today = capsys.readouterr().out.splitlines()[-1]
    legacy = yaml.safe_load((run / "config.yaml").read_text())  # version 1: "", 0 and [] meant the task's own
    del legacy["version"]
    legacy["task"] |= {"objective": "", "max_length": 0, "template": "", "verbalizers": []}
    legacy["adapter"]["extra_trainable"], legacy["train"]["select_metric"] = [], ""
    legacy["distill"] = {"teacher": "", "student": "lstm", "alpha": 0.5}  # the idle section every run carried
    (run / "config.yaml").write_text(yaml.safe_dump(legacy))
    assert main(["eval", str(run)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split(", ")[:-1] == today.split(", ")[:-1]  # all but speed


def test_every_documented_setting_is_an_option_showing_its_default():
    help_text = " ".join(_build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    sections = {"task": "task", "model": "model", "adapter": "adapter", "train": "train"}
    for section in sections:
        for item in dataclasses.fields(getattr(RunConfig(), section)):
            flag = "--" + (item.metadata.get("option") or item.name.replace("_", "-"))
            assert train_options()[flag[2:].replace("-", "_")].field is item
            assert f"{flag} " in help_text, flag
    assert "--lr LR peak learning rate (default: 0.0005)" in help_text
    assert "(default: the head of a classifier, else nothing)" in help_text
    assert distill_options()["epochs"].field.name == "epochs" and "teacher" not in distill_options()


def test_options_land_in_their_fields_and_lists_split_on_commas():
    parser = _build_parser()
    args = parser.parse_args(["train", "--lora-dropout", "0.3", "--targets", "q, v,o", "--extra-trainable", "",
                              "--model", "gpt2", "--lr", "1e-3"])
    config = train_config_from_args(args)
    assert config.adapter.dropout == 0.3 and config.adapter.targets == ["q", "v", "o"]
    assert config.adapter.extra_trainable == [] and config.model.name == "gpt2" and config.train.lr == 1e-3
    assert config.task.max_length is None  # not given: resolved when the run starts


def test_the_same_run_rule_matches_resolved_values_but_not_other_settings():
    from peftlab.config import same_run
    from peftlab.workloads.instruct import InstructConfig

    recorded = RunConfig(sections={"instruct": InstructConfig(template="Review: {text}\nSentiment:",
                                                                verbalizers=["bad", "good"])})
    recorded.task.name, recorded.task.objective, recorded.task.max_length = "rotten_tomatoes", "instruct", 128
    recorded.adapter.extra_trainable, recorded.train.select_metric = [], "accuracy"
    given = RunConfig()
    given.task.name = "rotten_tomatoes"
    assert same_run(recorded, given)  # every difference is a None the run resolved
    given.instruct = InstructConfig(predict="both")
    assert not same_run(recorded, given)  # the run predicted by generation
    given.instruct, given.train.lr = None, 1e-3
    assert not same_run(recorded, given)


def test_a_dpo_run_is_the_same_run_again_although_it_resolved_its_data_directory():
    """A DPO run records --preferences as its data directory (so `peftlab eval` finds the pairs); the same
    command or sweep point again, whose data_dir is still None, is that run (a finished one is skipped); another
    data directory is not."""
    from peftlab.config import same_run
    from peftlab.workloads.dpo import DPOConfig

    recorded = RunConfig(sections={"dpo": DPOConfig(preferences="runs/dpo/pairs.jsonl")})
    recorded.task.name, recorded.task.data_dir = "preferences", "runs/dpo/pairs.jsonl"
    recorded.task.objective, recorded.task.max_length = "dpo", 256
    recorded.adapter.extra_trainable, recorded.train.select_metric = [], "loss"
    given = RunConfig(sections={"dpo": DPOConfig(preferences="runs/dpo/pairs.jsonl")})
    given.task.name = "preferences"
    assert same_run(recorded, given)
    given.task.data_dir = "elsewhere/pairs.jsonl"
    assert not same_run(recorded, given)
