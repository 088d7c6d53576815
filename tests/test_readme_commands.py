"""The README's "Commands at a glance" runs as written: every command in it (on a tiny model, tiny synthetic data and
a few steps, appended as options the commands already take), and every option fragment in it is an option of its
row's command. A renamed option breaks this test, not a user. `python run.py` under a bare interpreter says how to
run it."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab.cli import _build_parser, _command_parser, main
from test_qa import colour_paragraphs, write_squad
from tiny_data import write_cola, write_rotten_tomatoes

REPO = Path(__file__).resolve().parents[1]


def glance_rows() -> list[list[str]]:
    """The backticked spans of each row of the README's "Commands at a glance" table (its "run" column)."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Commands at a glance", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[2] for line in section.splitlines() if line.startswith("| ") and line.count("|") >= 3]
    return [re.findall(r"`([^`]+)`", cell) for cell in rows[1:]]  # [1:]: the header row


def commands_and_fragments() -> tuple[list[list[str]], list[tuple[str, list[str]]]]:
    """The commands (argument lists after `peftlab`, or `python run.py ...`), and each option fragment with the
    command of its row (train where the row has none)."""
    commands, fragments = [], []
    for spans in glance_rows():
        row_commands = [shlex.split(span) for span in spans if span.startswith(("peftlab ", "python "))]
        commands += row_commands
        owner = next((words[1] for words in row_commands if words[0] == "peftlab"), "train")
        fragments += [(owner, shlex.split(span)) for span in spans if span.startswith("--")]
    return commands, fragments


def test_the_readme_block_is_found_and_holds_the_main_commands():
    commands, fragments = commands_and_fragments()
    names = {words[1] for words in commands}
    assert {"generate", "train", "eval", "predict", "icl", "export", "distill", "sweep", "report", "run.py"} <= names
    assert ["peftlab", "train", "--objective", "dpo"] in [words[:4] for words in commands]
    assert len(fragments) >= 5


def test_every_option_fragment_is_an_option_of_its_command():
    parser = _build_parser()
    for command, words in commands_and_fragments()[1]:
        options = _command_parser(parser, command)._option_string_actions
        unknown = [word for word in words if word.startswith("--") and word.split("=")[0] not in options]
        assert not unknown, f"README's `{' '.join(words)}`: {unknown} not an option of `peftlab {command}`"


@pytest.fixture
def tiny_world(tiny_model_dir, tmp_path, monkeypatch):
    """Synthetic CoLA, Rotten Tomatoes and SQuAD in one data directory (PEFTLAB_DATA, as the README sets it), a
    small grid, and the working directory."""
    data = tmp_path / "data"
    write_cola(data, train_rows=32, dev_rows=16)
    write_rotten_tomatoes(data)
    write_squad(data, colour_paragraphs(6), colour_paragraphs(4, offset=3))
    grid = tmp_path / "grid.yaml"
    grid.write_text(json.dumps({"output_dir": "runs/sweep", "base": {
        "model": {"name": tiny_model_dir}, "task": {"name": "cola", "train_limit": 16, "eval_limit": 8},
        "train": {"epochs": 1, "batch_size": 8, "device": "cpu"}}, "grid": {"adapter.rank": [2, 4]}}))
    pairs = tmp_path / "pairs.jsonl"  # DPO's preference pairs: three prompts, one of them held out
    pairs.write_text("".join(json.dumps({"prompt": f"the film {word}", "chosen": " is great .", "rejected": " is dull ."})
                             + "\n" for word in ("starts", "opens", "ends") for _ in range(2)))
    monkeypatch.setenv("PEFTLAB_DATA", str(data))
    monkeypatch.chdir(tmp_path)
    return {"model": tiny_model_dir, "data": str(data), "grid": str(grid)}


def tiny_arguments(words: list[str], world: dict) -> list[str]:
    """A README command made small: its placeholders filled in, the sweep's grid file swapped for a tiny one, and
    options that keep it to a tiny model and a few steps appended (the README's own options stay as written)."""
    placeholders = {"DIR": world["data"], "OUT": "exported", "RUN...": "runs/cola", "RUN_OR_SWEEP...": "runs/cola",
                    "SEED": "1", "examples/sweep-rt.yaml": world["grid"]}
    words = [placeholders.get(word, word) for word in words]
    model, cpu = ["--model", world["model"]], ["--device", "cpu"]
    command = words[1]
    if command in ("generate", "run.py"):
        return words + model + ["--max-new-tokens", "2"]
    if command == "train" and "--resume" not in words:
        small = model + cpu + ["--train-limit", "16", "--eval-limit", "8", "--epochs", "1", "--max-steps", "2",
                               "--batch-size", "8"]
        return words + small + (["--max-length", "60"] if "squad" in words else [])
    if command == "eval" and "--task" in words:  # zero-shot: the base model
        return words + model + cpu + ["--eval-limit", "4"]
    if command == "icl":
        return words + model + cpu + ["--limit", "4", "--shots", "0,1"]  # the tiny model reads 64 tokens
    if command == "distill":
        return words + cpu + ["--seeds", "1", "--epochs", "1", "--embedding-size", "8", "--hidden-size", "8"]
    return words


def test_every_command_at_a_glance_runs(tiny_world, capsys):
    commands, _ = commands_and_fragments()
    for words in commands:
        arguments = tiny_arguments(words, tiny_world)
        if arguments[0] == "python":
            result = subprocess.run([sys.executable, str(REPO / arguments[1]), *arguments[2:]], capture_output=True,
                                    text=True, timeout=300)
            assert result.returncode == 0, f"{shlex.join(words)}: {result.stderr[-2000:]}"
            continue
        code = main(arguments[1:])
        captured = capsys.readouterr()
        assert code == 0, f"README's `{shlex.join(words)}` failed as `{shlex.join(arguments)}`: {captured.err[-2000:]}"
    for written in ("runs/cola/summary.json", "runs/cola-more/summary.json", "exported/adapter_config.json",
                    "runs/sweep/report.md", "runs/report/report.md", "report.html", "runs/icl-rt/results.json",
                    "runs/dpo/summary.json"):
        assert Path(written).is_file(), written


def test_run_py_under_a_bare_python_says_how_to_run_it():
    result = subprocess.run([sys.executable, "-I", "-S", str(REPO / "run.py"), "gen", "23006"], capture_output=True,
                            text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot import peftlab" in result.stderr and ".venv/bin/python run.py gen 23006" in result.stderr
