"""A workload defined outside peftlab is a full citizen once registered: its settings section is in config.yaml and
on `peftlab train`, it trains, evaluates and reloads like any run, and its own command is on the command line,
while no file of peftlab knows it (as tests/peft/test_method_protocol.py does for adapter methods)."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from test_train import write_cola

from peftlab.cli import main
from peftlab.data.datasets import get_dataset
from peftlab.data import LabelledText
from peftlab.errors import PeftlabError
from peftlab.runs import RunDir
from peftlab.settings import setting
from peftlab.workloads.base import Workload
from peftlab.workloads.classification.workload import ClassificationTask
from peftlab.workloads.loading import load_run
from peftlab.workloads.registry import Command, WorkloadSpec, register_workload, unregister_workload

NAME = "wordcount"


@dataclass
class WordCountSettings:
    modulus: int = setting(2, "wordcount: the label is a sentence's number of words modulo this")


class WordCountTask(ClassificationTask):
    """CoLA's sentences labelled by their number of words modulo `modulus` (a task CoLA's labels know nothing of)."""

    def __init__(self, data_dir, tokenizer, modulus: int):
        dataset = get_dataset("cola")
        self.modulus = modulus

        def read(split):
            return [LabelledText(row.text, len(row.text.split()) % modulus, row.origin)
                    for row in dataset.read(split, data_dir)]

        super().__init__("cola", [str(label) for label in range(modulus)], read, tokenizer, 128)


class WordCountWorkload(Workload):
    name = NAME
    default_extra_trainable = ("head",)

    def task_for(self, config, tokenizer):
        return WordCountTask(config.task.data_dir, tokenizer, config.sections[NAME].modulus)

    def model_options(self, task):
        return {"num_labels": task.num_labels}


def label_counts_arguments(parser):
    parser.add_argument("run_dir")


def label_counts(args):
    """`peftlab wordcount-labels RUN_DIR`: the run's training labels per class."""
    config, task, _ = load_run(args.run_dir)
    labels = [example.target for example in task.encode("train")]
    print(json.dumps({"modulus": config.sections[NAME].modulus,
                      "counts": [labels.count(label) for label in range(task.num_labels)]}))


@pytest.fixture
def wordcount():
    spec = register_workload(WorkloadSpec(
        name=NAME, workload=WordCountWorkload, settings=WordCountSettings, chosen_by="section",
        commands=(Command("wordcount-labels", "count a wordcount run's training labels", label_counts_arguments,
                          label_counts),)))
    yield spec
    unregister_workload(NAME)


def test_an_outside_workload_trains_evaluates_reloads_and_runs_its_command(wordcount, tiny_model_dir, tmp_path, capsys):
    data = write_cola(tmp_path / "data", train_rows=32, dev_rows=12)
    run = tmp_path / "run"
    assert main(["train", "--task", "cola", "--model", tiny_model_dir, "--data-dir", data, "--modulus", "3",
                 "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--output-dir", str(run)]) == 0
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded[NAME] == {"modulus": 3}

    config, task, model = load_run(str(run))
    assert isinstance(task, WordCountTask) and task.modulus == 3 and config.sections[NAME].modulus == 3
    assert model.score.out_features == 3  # the workload's own head size reached the model
    sentences = get_dataset("cola").read("validation", data)
    assert [example.target for example in task.encode("validation")] == [len(row.text.split()) % 3 for row in sentences]

    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    summary = RunDir(str(run)).read_summary()
    evaluated = capsys.readouterr().out.splitlines()[-1]
    assert f"({len(sentences)} examples)" in evaluated
    assert f"Accuracy: {summary['best']['val_accuracy']:.4f}" in evaluated  # the same checkpoint, the same score

    assert main(["wordcount-labels", str(run)]) == 0
    counted = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    train_labels = [len(row.text.split()) % 3 for row in get_dataset("cola").read("train", data)]
    assert counted == {"modulus": 3, "counts": [train_labels.count(label) for label in range(3)]}


def test_an_outside_workload_is_unknown_to_peftlab_and_gone_once_unregistered(wordcount, tmp_path):
    sources = Path(__file__).resolve().parents[1] / "src" / "peftlab"
    assert not [path for path in sources.rglob("*.py") if NAME in path.read_text()]
    with pytest.raises(SystemExit) as shown:
        main(["wordcount-labels", "--help"])
    assert shown.value.code == 0
    unregister_workload(NAME)
    from peftlab.config import RunConfig

    with pytest.raises(PeftlabError, match=f"unknown key\\(s\\) {NAME}"):
        RunConfig.from_dict({NAME: {"modulus": 3}})
    register_workload(wordcount)  # the fixture removes it again


def test_a_workload_name_must_be_new(wordcount):
    with pytest.raises(PeftlabError, match="registered already"):
        register_workload(wordcount)
    with pytest.raises(PeftlabError, match="registered already"):
        register_workload(WorkloadSpec(name="train", workload=WordCountWorkload))
