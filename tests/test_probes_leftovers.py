"""Issue 31, items 4-6: a prefix that leaves the model too few positions, generate's length advice, and the
leftovers (export refusals naming the CLI format, recipe errors naming the file, options a method does not use,
a tracker that is installed but does not import). Each test fails on the code before the fix."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from test_train import tiny_config
from tiny_data import write_cola
from tiny_models import tiny_gpt2

from peftlab import PeftlabError
from peftlab.cli import main
from peftlab.generate import generate
from peftlab.models import convert_conv1d_to_linear, gpt2_tokenizer
from peftlab.peft import apply_method
from peftlab.sampling import Sampling
from peftlab.train import validate


@pytest.fixture(scope="module")
def model_256(tmp_path_factory):
    """A tiny GPT-2 with 256 positions, saved as a local Hugging Face directory."""
    directory = tmp_path_factory.mktemp("tiny-gpt2-256")
    tiny_gpt2(seed=0, n_positions=256).save_pretrained(directory)
    gpt2_tokenizer().save_pretrained(directory)
    return str(directory)


@pytest.fixture
def tokenizer(gpt2_tokenizer):
    return gpt2_tokenizer


def no_impossible_number(message: str) -> None:
    assert not re.search(r"-\d", message), message  # no negative count
    assert "at most 0" not in message, message


# ---------------------------------------------------------------------------------------------------------
# Item 4: --prefix-length + --max-length beyond the model's positions


def test_prefix_longer_than_the_positions_is_refused_before_anything_is_written(model_256, tmp_path, capsys):
    data = write_cola(tmp_path / "data", train_rows=16, dev_rows=8)
    run = tmp_path / "run"
    code = main(["train", "--task", "cola", "--data-dir", data, "--model", model_256, "--method", "prefix",
                 "--prefix-length", "250", "--max-length", "64", "--device", "cpu", "--epochs", "1",
                 "--output-dir", str(run)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--prefix-length 250 + --max-length 64 = 314 positions" in err and "has 256" in err
    assert "Fix: --prefix-length at most 192, or --max-length at most 6" in err
    assert not (run / "config.yaml").exists() and not run.exists()


def test_a_prefix_that_fits_passes_validation(model_256, tmp_path):
    config = tiny_config(model_256, str(tmp_path), tmp_path / "run")
    config.adapter.method, config.adapter.prefix_length, config.task.max_length = "prefix", 192, 64
    validate(config)  # 192 + 64 = 256: fits exactly
    config.task.max_length = 300  # beyond the model's positions for any method: the hook checks the real tokens
    validate(config)
    config.task.max_length = 65
    with pytest.raises(PeftlabError, match=r"= 257 positions, but .* has 256"):
        validate(config)


def test_prefix_module_refuses_inputs_beyond_the_positions():
    model = tiny_gpt2(seed=0, vocab_size=100, special_id=0)  # 64 positions
    with pytest.raises(PeftlabError, match="--prefix-length 64 leaves no position"):
        apply_method(tiny_gpt2(seed=0, vocab_size=100, special_id=0), {"method": "prefix", "prefix_length": 64})
    apply_method(model, {"method": "prefix", "prefix_length": 40})
    model(torch.ones(2, 24, dtype=torch.long))  # 40 + 24 = 64: fits
    with pytest.raises(PeftlabError, match=r"40 prefix positions \+ 25 tokens = 65 positions, but the model has 64"):
        model(torch.ones(2, 25, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------
# Item 5: generate suggests only limits that can be followed


@pytest.fixture
def tiny_lm():
    model = tiny_gpt2(seed=1)  # 64 positions
    convert_conv1d_to_linear(model)
    return model


def test_a_prompt_longer_than_the_context_is_told_how_much_to_cut(tiny_lm, tokenizer):
    prompt = " ".join(["word"] * 300)  # 300 tokens, the context is 64
    with pytest.raises(PeftlabError) as caught:
        generate(tiny_lm, tokenizer, prompt, Sampling(max_new_tokens=20))
    message = str(caught.value)
    no_impossible_number(message)
    assert "prompt 1 is 300 tokens" in message and "context of 64 tokens" in message
    assert "shorten the prompt by at least 237 tokens (256 to keep --max-new-tokens 20)" in message
    assert "--max-new-tokens to at most" not in message


def test_too_many_new_tokens_is_told_a_positive_limit(tiny_lm, tokenizer):
    prompt = " ".join(["word"] * 10)
    with pytest.raises(PeftlabError) as caught:
        generate(tiny_lm, tokenizer, prompt, Sampling(max_new_tokens=100))
    message = str(caught.value)
    no_impossible_number(message)
    assert "lower --max-new-tokens to at most 54" in message and "shorten" not in message  # 100 > 64: no prompt fits
    with pytest.raises(PeftlabError, match=r"at most 4, or shorten the prompt by 6 tokens"):
        generate(tiny_lm, tokenizer, " ".join(["word"] * 60), Sampling(max_new_tokens=10))


def test_a_prefix_takes_its_positions_from_the_context(tokenizer):
    model = tiny_gpt2(seed=1)
    convert_conv1d_to_linear(model)
    apply_method(model, {"method": "prefix", "prefix_length": 20})
    prompt = " ".join(["word"] * 40)  # 40 + 10 fits 64, but not 64 - 20
    with pytest.raises(PeftlabError, match=r"less its 20-position prefix \(44 left\)\. Fix: lower --max-new-tokens to "
                                           r"at most 4"):
        generate(model, tokenizer, prompt, Sampling(max_new_tokens=10))
    generate(model, tokenizer, prompt, Sampling(max_new_tokens=4))


# ---------------------------------------------------------------------------------------------------------
# Item 6: the leftovers


def test_export_refusals_name_the_command_line_format(tmp_path):
    from peftlab.hf import export_peft

    model = tiny_gpt2(seed=0, vocab_size=100, special_id=0)
    convert_conv1d_to_linear(model)
    apply_method(model, {"method": "bitfit"})
    with pytest.raises(PeftlabError, match="--format merged"):
        export_peft(model, tmp_path / "out", "tiny")


@pytest.mark.parametrize("text, problem", [
    ("adapter:\n  rank: eight\n", "adapter.rank: expected int, found 'eight'"),
    ("adapter:\n  rnak: 8\n", "adapter: unknown key(s) rnak (did you mean rank?)"),
    ("adaptr:\n  rank: 8\n", "unknown key(s) adaptr (did you mean adapter?)"),
    ("adapter: [\n", "not valid YAML (line 2, column 1)"),
])
def test_recipe_file_errors_name_the_file(tmp_path, capsys, text, problem):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(text)
    code = main(["train", "--recipe", str(recipe), "--dry-run", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"recipe {recipe}: {problem}" in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("method, given, warned", [
    ("ia3", {"rank": 4, "alpha": 8.0}, "--rank, --alpha not used by --method ia3"),
    ("lora", {"prefix_length": 20}, "--prefix-length not used by --method lora"),
    ("prefix", {"targets": ["q", "k"]}, "--targets not used by --method prefix"),
])
def test_options_a_method_does_not_use_are_named(tmp_path, tiny_model_dir, capsys, method, given, warned):
    config = tiny_config(tiny_model_dir, str(tmp_path), tmp_path / "run")
    config.adapter.rank, config.adapter.alpha, config.adapter.dropout = 8, 16.0, 0.0  # the defaults
    config.adapter.targets = ["q", "v"]
    config.adapter.method = method
    config.task.max_length = 32
    for name, value in given.items():
        setattr(config.adapter, name, value)
    validate(config)
    out = capsys.readouterr().out
    assert f"warning: {warned} (ignored)" in out


def test_default_settings_of_another_method_are_not_warned_about(tmp_path, tiny_model_dir, capsys):
    config = tiny_config(tiny_model_dir, str(tmp_path), tmp_path / "run")
    config.adapter.rank, config.adapter.alpha, config.adapter.dropout = 8, 16.0, 0.0
    config.adapter.method = "lora"
    validate(config)  # lora with rank, alpha and all-linear targets; prefix and adapter settings at their defaults
    assert "warning" not in capsys.readouterr().out


def test_a_tracker_that_does_not_import_is_refused_up_front(tmp_path, monkeypatch):
    from peftlab.trackers import check_trackers

    broken = tmp_path / "wandb"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('cannot import name Thing from wandb.sdk')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    with pytest.raises(PeftlabError) as caught:
        check_trackers(["wandb"])
    message = str(caught.value)
    assert message.startswith("--report-to wandb: the wandb package is installed but fails to import")
    assert "ImportError: cannot import name Thing from wandb.sdk" in message and "\n" not in message
