"""docs/course.md's parameter counts (examples/course/gpt2_counts.py) against hand-written formulas: LoRA on a
d_in -> d_out linear has r * (d_in + d_out) parameters; GPT-2 small has 12 blocks of width 768, medium 24 of 1024."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "examples" / "course" / "gpt2_counts.py"
spec = importlib.util.spec_from_file_location("gpt2_counts", SCRIPT)
counts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(counts)

GPT2_MEDIUM_LM = 354_823_168  # GPT-2 medium with its tied LM head (354.82M)


def test_e0270_seed_reports():
    small, medium = counts.e0270_report("gpt2"), counts.e0270_report("gpt2-medium")
    assert (small.total, small.trainable, f"{small.reduction:.4f}") == (125_031_168, 629_760, "0.9950")
    assert (medium.total, medium.trainable, f"{medium.reduction:.4f}") == (356_398_080, 1_675_264, "0.9953")


def test_homework3_qkv_at_rank_128_on_gpt2_medium():
    separate = 24 * 3 * 128 * (1024 + 1024)
    fused = 24 * 128 * (1024 + 3 * 1024)
    assert counts.separate_qkv_adapter_count("gpt2-medium", 128) == (separate, GPT2_MEDIUM_LM + separate)
    assert counts.fused_adapter_count("gpt2-medium", ["q", "k", "v"], 128) == (fused, GPT2_MEDIUM_LM + fused)
    assert f"{100 * separate / (GPT2_MEDIUM_LM + separate):.2f}" == "5.05"


@pytest.mark.parametrize("rank", counts.SQUAD_RANKS)
def test_squad_report_target_sets_on_gpt2_small(rank):
    c_attn, attn_proj, mlp_proj = 12 * rank * (768 + 3 * 768), 12 * rank * (768 + 768), 12 * rank * (4 * 768 + 768)
    expected = [c_attn, c_attn + attn_proj, c_attn + attn_proj + mlp_proj]
    actual = [counts.fused_adapter_count("gpt2", targets, rank)[0] for targets in counts.SQUAD_TARGETS.values()]
    assert actual == expected
