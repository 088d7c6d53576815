"""Writes the run directories that tests/test_legacy_runs.py loads: tiny runs trained by an older peftlab, kept
(their config.yaml, metrics.jsonl, summary.json and best checkpoint) so that every later version is checked to
load and evaluate them the same.

    git worktree add /tmp/old <commit>
    PYTHONPATH=/tmp/old/src .venv/bin/python tests/legacy_runs/make_runs.py tests/legacy_runs/<commit>

The tiny model is tests/tiny_models.py's GPT-2 (seed 0) and the data tests/tiny_data.py's, both rebuilt by the test;
the kept files name them `TINY_MODEL` and `DATA` (and the runs' folder `RUNS`).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from tiny_data import write_cola, write_rotten_tomatoes  # noqa: E402
from tiny_models import tiny_gpt2  # noqa: E402

from peftlab.cli import main  # noqa: E402
from peftlab.models import gpt2_tokenizer  # noqa: E402

KEPT = ("config.yaml", "metrics.jsonl", "summary.json")


def runs(model: str, data: str, out: Path) -> dict[str, list[str]]:
    """run name -> its command line (training on the tiny data, one short epoch each)."""
    common = ["--model", model, "--data-dir", data, "--device", "cpu", "--epochs", "1"]
    return {
        "cola-lora": ["train", "--task", "cola", *common, "--batch-size", "16", "--rank", "4",
                      "--targets", "all-linear", "--output-dir", str(out / "cola-lora")],
        "cola-dora": ["train", "--task", "cola", *common, "--batch-size", "16", "--method", "dora",
                      "--output-dir", str(out / "cola-dora")],
        "cola-prefix": ["train", "--task", "cola", *common, "--batch-size", "16", "--method", "prefix",
                        "--prefix-length", "4", "--output-dir", str(out / "cola-prefix")],
        "rt-instruct": ["train", "--task", "rotten_tomatoes", *common, "--batch-size", "8", "--train-limit", "32",
                        "--eval-limit", "12", "--test-limit", "12", "--predict", "both",
                        "--output-dir", str(out / "rt-instruct")],
        "distill": ["distill", "--teacher", str(out / "cola-lora"), "--data-dir", data, "--device", "cpu",
                    "--epochs", "1", "--hidden-size", "16", "--embedding-size", "8",
                    "--output-dir", str(out / "distill")],
    }


def main_(target: Path) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = scratch / "tiny-gpt2"
        tiny_gpt2(seed=0).save_pretrained(model)
        gpt2_tokenizer().save_pretrained(model)
        data = scratch / "data"
        data.mkdir()
        write_cola(data), write_rotten_tomatoes(data)
        trained = scratch / "runs"
        for name, arguments in runs(str(model), str(data), trained).items():
            assert main(arguments) == 0, name
            keep(trained / name, target / name, {str(model): "TINY_MODEL", str(data): "DATA", str(trained): "RUNS"})


def keep(run: Path, target: Path, names: dict[str, str]) -> None:
    """The run's files a reload needs, with this machine's paths replaced by names."""
    shutil.rmtree(target, ignore_errors=True)
    (target / "checkpoints").mkdir(parents=True)
    for name in KEPT:
        shutil.copy(run / name, target / name)
    shutil.copytree(run / "checkpoints" / "best", target / "checkpoints" / "best")
    if (run / "student_vocabulary.json").is_file():  # a distilled student's own vocabulary
        shutil.copy(run / "student_vocabulary.json", target / "student_vocabulary.json")
    for path in [*target.glob("*.yaml"), *target.rglob("*.json"), *target.glob("*.jsonl")]:
        text = path.read_text()
        for machine_path, placeholder in names.items():
            text = text.replace(machine_path, placeholder)
        path.write_text(text)


if __name__ == "__main__":
    main_(Path(sys.argv[1]))
