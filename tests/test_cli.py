import subprocess
import sys
from pathlib import Path

import pytest

from peftlab.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_models_lists_every_known_model(capsys):
    from peftlab.models import KNOWN_MODELS

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in KNOWN_MODELS:
        assert name in out
    assert "(default)" in out


def test_generate_random_gpt2_prints_summary_and_text(capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\nSecond prompt\n")
    code = main(["generate", "--model", "gpt2", "--init", "random", "--prompt-file", str(prompts),
                 "--max-new-tokens", "5", "--temperature", "0.7", "--num-samples", "2"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "gpt2: number of parameters: 124.44M"
    assert "--- prompt 2, sample 2 ---\nSecond prompt" in out


def test_errors_exit_non_zero_with_a_message(capsys):
    assert main(["generate", "--model", "gpt3", "--prompt", "x"]) == 2
    assert "unknown model 'gpt3'" in capsys.readouterr().err
    assert main(["generate", "--model", "gpt2", "--init", "random"]) == 2
    assert "no prompt given" in capsys.readouterr().err


def test_console_entry_points_run(tmp_path):
    """`python -m peftlab` and `python run.py` are real processes with real exit codes."""
    result = subprocess.run([sys.executable, "-m", "peftlab", "generate", "--model", "nope", "--prompt", "x"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "unknown model 'nope'" in result.stderr
    result = subprocess.run([sys.executable, str(REPO / "run.py"), "gen"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage: python run.py" in result.stderr


@pytest.mark.slow
def test_run_py_gen_is_reproducible_on_the_real_model():
    command = [sys.executable, str(REPO / "run.py"), "gen", "23006", "--max-new-tokens", "24"]
    first = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    second = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert first == second
    assert first.startswith("smollm2-135m: number of parameters: 134.52M")
    assert "grant me the serenity" in first


def test_version_names_peftlab_and_its_libraries(capsys):
    from importlib import metadata

    from peftlab import __version__

    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"peftlab {__version__} (torch {metadata.version('torch')}, transformers ")


def test_predict_is_a_command_that_checks_its_inputs_before_loading_anything(capsys, tmp_path):
    assert main(["predict", str(tmp_path)]) == 2
    assert "no input given: pass --text TEXT (repeatable) or --input FILE" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "missing"), "--text", "x"]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), "--input", str(tmp_path / "none.txt")]) == 2
    assert "cannot read input file" in capsys.readouterr().err


def test_load_run_is_offered_by_peftlab_without_importing_it_first():
    code = ("import sys, peftlab\nassert 'peftlab.predict' not in sys.modules\nfrom peftlab import load_run\n"
            "import peftlab.predict\nassert load_run is peftlab.predict.load_run\n"
            "try:\n    peftlab.nothing\nexcept AttributeError as error:\n    print(error)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "module 'peftlab' has no attribute 'nothing'"
