"""Reports of runs: plots (PNG, `report.plots`), tables (markdown, `report.tables`) and one self-contained HTML page
(`report.html`); `write_report` / `write_methods_report` are `peftlab report`'s two modes."""

from __future__ import annotations

from pathlib import Path

from peftlab.errors import PeftlabError
from peftlab.fileio import read_text, write_text_atomic
from peftlab.report.plots import (METRIC_LABELS, plot_comparison, plot_history, plot_score_vs_parameters,
                                  plot_validation_loss, run_title, save_figure)
from peftlab.report.tables import (RESULTS, RESULTS_TABLE, evaluation_plots, evaluation_text, method_label,
                                   method_settings, methods_table, read_run, run_status, runs_table)
from peftlab.runs import METRICS

__all__ = ["METRIC_LABELS", "REPORT_MARKER", "REPORT_PLOTS", "RESULTS", "RESULTS_TABLE", "method_label",
           "method_settings", "methods_table", "plot_comparison", "plot_history", "plot_score_vs_parameters", "plot_validation_loss", "print_report",
           "read_run", "run_status", "run_title", "runs_table", "save_figure", "write_methods_report", "write_report"]


REPORT_MARKER = "<!-- peftlab report -->"  # report.md's first line: only such a report (and its plot) is replaced


REPORT_PLOTS = ("val_loss.png", "score_vs_parameters.png")


def _check_report_folder(output: Path) -> Path:
    """report.md in `output`, after making sure no report or plot there is anyone else's."""
    table = output / "report.md"
    ours = table.is_file() and read_text(table, "report").startswith(REPORT_MARKER)
    theirs = [name for name in ("report.md", *REPORT_PLOTS) if (output / name).exists()]
    if not ours and theirs:
        raise PeftlabError(f"{output} already has a {theirs[0]} that peftlab did not write; nothing was changed. "
                           "Fix: choose another --output-dir")
    return table


def write_report(run_dirs: list[str], output_dir: str | Path,
                 failures: dict[str, str] | None = None) -> tuple[Path, list[Path]]:
    """report.md (the table), val_loss.png (curves or bars) and score_vs_parameters.png for `run_dirs`, written
    into `output_dir`. The table's status column marks runs that are not finished (unfinished at step N, failed);
    `failures`: {run directory: error line} of runs known to have failed (a sweep's points).

    An earlier peftlab report there is replaced; a report.md or plot of anyone else is never overwritten.
    """
    output = Path(output_dir)
    table = _check_report_folder(output)
    errors = {Path(run_dir): line for run_dir, line in (failures or {}).items()}
    runs = [read_run(run_dir, errors.get(Path(run_dir))) for run_dir in run_dirs]
    trained = [run for run in runs if "kind" not in run]
    evaluated = [run for run in runs if "kind" in run]  # icl runs: their own tables and plots, as written
    text = (runs_table(trained) if trained else "") + "".join(evaluation_text(run) for run in evaluated)
    write_text_atomic(table, f"{REPORT_MARKER}\n{text}")
    plots = [plot_validation_loss(trained, output / REPORT_PLOTS[0]),
             plot_score_vs_parameters(trained, output / REPORT_PLOTS[1])] if trained else []
    return table, plots + [plot for run in evaluated for plot in evaluation_plots(run)]


def write_methods_report(folders: list[str], output_dir: str | Path) -> tuple[Path, list[Path]]:
    """report.md (`methods_table`) and score_vs_parameters.png over sweep folders (a task's runs may span several,
    e.g. its comparison and its extra seeds), matching runs by name; a folder's runs are its subdirectories with
    results."""
    output = Path(output_dir)
    table = _check_report_folder(output)
    tasks = {}
    for folder in folders:
        run_dirs = sorted(path for path in Path(folder).iterdir() if (path / METRICS).is_file())
        if not run_dirs:
            raise PeftlabError(f"{folder} holds no runs with results (subdirectories with {METRICS})")
        runs = [read_run(path) for path in run_dirs]
        tasks.setdefault(runs[0]["config"]["task"]["name"], []).extend(runs)  # several folders may share a task
    write_text_atomic(table, f"{REPORT_MARKER}\n{methods_table(tasks)}")
    every_run = [run for runs in tasks.values() for run in runs]
    return table, [plot_score_vs_parameters(every_run, output / REPORT_PLOTS[1])]


def print_report(table: Path, plots: list[Path]) -> None:
    """What `write_report` wrote, for the terminal."""
    print(read_text(table, "report").removeprefix(f"{REPORT_MARKER}\n") + f"\ntable: {table}\n"
          + "".join(f"plot: {plot}\n" for plot in plots), end="")
