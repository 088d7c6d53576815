"""Sweep/report plots: the validation-loss figure picks curves or bars by how often the runs were evaluated."""

import struct

from peftlab.report import plot_validation_loss


def _png_size(path) -> tuple[int, int]:
    width, height = struct.unpack(">II", path.read_bytes()[16:24])  # the IHDR chunk
    return width, height


def _run(name: str, losses: list[float]) -> dict:
    return {"name": name, "rows": [{"step": 10 * (index + 1), "val_loss": loss} for index, loss in enumerate(losses)]}


def test_runs_evaluated_once_get_one_bar_each_and_runs_with_history_get_curves(tmp_path):
    once = [_run(f"rank{rank}", [1.0 / rank]) for rank in (4, 8, 16)]
    bars = plot_validation_loss(once, tmp_path / "bars.png")
    curves = plot_validation_loss(once + [_run("long", [1.2, 0.9])], tmp_path / "curves.png")
    # 110 dpi: bars are (1.5 + 0.4 per run) inches tall, curves 4.5 inches.
    assert _png_size(bars) == (770, round((1.5 + 0.4 * 3) * 110))
    assert _png_size(curves) == (770, round(4.5 * 110))


def test_runs_without_validation_are_left_out_of_the_plot(tmp_path):
    runs = [_run("evaluated", [0.5]), {"name": "not-evaluated", "rows": [{"step": 5, "train_loss": 1.0}]}]
    assert _png_size(plot_validation_loss(runs, tmp_path / "one.png"))[1] == round((1.5 + 0.4) * 110)
