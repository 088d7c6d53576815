"""`peftlab report RUN_OR_FOLDER... --html OUT.html`: one self-contained page (no file beside it is needed) for
runs, sweeps or a distillation comparison.

For several runs: the comparison table and plots of `peftlab report`. For a folder (a sweep, a comparison): its own
tables (*.md) and plots (*.png), then its runs; a folder of results alone (a `peftlab frontier`) is shown too. For
each run: what it trained (parameters, examples, time), a row per evaluation, its plots (drawn afresh), the best
checkpoint, its config.yaml and the command that started it. Images are embedded as data URIs; a one-line script
records how many of them the browser decoded (`data-images-decoded`).
"""

from __future__ import annotations

import base64
import html
import json
import re
import tempfile
from pathlib import Path

import yaml

from peftlab.errors import PeftlabError
from peftlab.fileio import check_writable, read_text, write_text_atomic
from peftlab.report import REPORT_PLOTS
from peftlab.report.plots import METRIC_LABELS, plot_history, plot_score_vs_parameters, plot_validation_loss, run_title
from peftlab.report.tables import (KIND_TITLES, RESULTS_TABLE, count_text, evaluation_plots, finished,  # noqa: F401
                                   method_label, read_run, run_status, runs_table)  # (finished: here before)
from peftlab.runs import CONFIG, STEPS, RunDir

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; }
th { background: #f3f3f3; } td.number { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td { background: #fff6cc; font-weight: 600; }
img { max-width: 100%; border: 1px solid #eee; margin: .4em .4em 0 0; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .85em; }
.note { color: #666; }
"""
HTML_MARKER = "<!-- peftlab report -->"  # only a page with it is replaced
COUNT_IMAGES = ("<script>window.addEventListener('load', () => { const images = [...document.images]; "
                "document.body.dataset.imagesDecoded = images.filter(i => i.complete && i.naturalWidth > 0).length "
                "+ '/' + images.length; });</script>")


def write_html_report(paths: list[str], output: str | Path) -> Path:
    """The page for `paths` (run directories and folders of runs) at `output` (atomically)."""
    output = Path(output)
    if output.suffix.lower() not in (".html", ".htm"):
        raise PeftlabError(f"--html {output}: expected a file name ending in .html")
    check_writable(output)
    if output.is_file() and not read_text(output, "page").startswith(HTML_MARKER):
        raise PeftlabError(f"{output} exists and is not a page peftlab wrote; nothing was changed. Fix: choose another "
                           "file name")
    sections, runs = [], []
    for path in map(Path, paths):
        if (path / CONFIG).is_file():
            runs.append(read_run(path))
        elif path.is_dir():
            sections.append(folder_section(path))
            runs += [read_run(child) for child in sorted(path.iterdir()) if (child / CONFIG).is_file()]
        else:
            raise PeftlabError(f"{path} is neither a run directory (config.yaml) nor a folder of runs")
    if not runs and not any(sections):  # a folder of results without runs (a reward-KL frontier) is a page too
        raise PeftlabError(f"no runs in {', '.join(paths)} (run directories hold {CONFIG}), nor tables or plots")
    trained = [run for run in runs if "kind" not in run]
    if len(trained) > 1:
        sections.insert(0, comparison_section(trained))
    sections += [evaluation_section(run) if "kind" in run else run_section(run) for run in runs]
    title = f"peftlab report: {', '.join(Path(path).name for path in paths)}"
    page = (f"{HTML_MARKER}\n<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n" + "\n".join(sections)
            + f"\n{COUNT_IMAGES}\n</body></html>\n")
    write_text_atomic(output, page)
    return output


def comparison_section(runs: list[dict]) -> str:
    with tempfile.TemporaryDirectory() as folder:
        plots = [plot_validation_loss(runs, Path(folder) / "val_loss.png"),
                 plot_score_vs_parameters(runs, Path(folder) / "score_vs_parameters.png")]
        images = "".join(image(plot) for plot in plots)
    return f"<h2>Comparison of {len(runs)} runs</h2>\n{markdown_tables(runs_table(runs))}\n{images}"


def folder_section(folder: Path) -> str:
    """A folder's own tables and plots (a distillation's comparison.md and .png); `peftlab report`'s own files
    are left out, as the page draws the comparison afresh."""
    ours = {"report.md", *REPORT_PLOTS}
    tables = "".join(markdown_tables(read_text(path, "report")) for path in sorted(folder.glob("*.md"))
                     if path.name not in ours)
    images = "".join(image(path) for path in sorted(folder.glob("*.png")) if path.name not in ours)
    return f"<h2>{html.escape(str(folder))}</h2>\n{tables}{images}" if tables or images else ""


def run_section(run: dict) -> str:
    config, summary, rows = run["config"], run["summary"], run["rows"]
    path = Path(run["path"])
    parameters = summary.get("parameters") or {}
    facts = [("task", config["task"]["name"]), ("model", config["model"]["name"]),
             ("method", method_label(config)),
             ("total parameters", count_text(parameters.get("total"))),
             ("trainable parameters", count_text(parameters.get("trainable"))),
             ("adapter parameters", count_text(parameters.get("adapter"))),
             ("reduction", f"{100 * parameters['reduction']:.2f}%" if "reduction" in parameters else "—"),
             ("training examples", count_text(summary.get("train_examples"))),
             ("validation examples", count_text(summary.get("validation_examples"))),
             ("steps", count_text(summary.get("steps_completed", rows[-1]["step"] if rows else None))),
             ("status", run.get("status") or run_status(run)),
             ("training time", f"{sum(summary['seconds_per_epoch']):.0f} s" if summary.get("seconds_per_epoch") else "—"),
             ("wall time", f"{summary['elapsed_seconds']:.0f} s" if summary.get("elapsed_seconds") else "—")]
    best = summary.get("best") or {}
    test = summary.get("test")
    if test:
        examples = f", {test['examples']} examples" if "examples" in test else ""
        facts.append((f"test ({test['split']}{examples})",
                      ", ".join(f"{key} {value:.4f}" for key, value in test.items()
                                if isinstance(value, float) and key != "examples_per_second")))
    environment = config.get("environment") or {}
    command = environment.get("command") or ("(not recorded: the run was started from Python without a command "
                                             "line, or written before config.yaml recorded its command)")
    recorded = {key: value for key, value in config.items() if key != "environment"}
    plots = run_plots(run, path)
    status = run.get("status") or run_status(run)
    marked = "" if status == "finished" else f" ({status.split(':')[0]})"  # unfinished at step N, failed
    return (f"<h2>Run {html.escape(run['name'])}{html.escape(marked)}</h2>\n<p class='note'>{html.escape(str(path))}</p>\n"
            f"{facts_table(facts)}\n<h3>Evaluations</h3>\n{evaluations_table(rows, best.get('step'))}\n"
            f"<p>Best checkpoint: step {best.get('step', '—')} by validation {summary.get('select_metric', '—')} "
            f"({html.escape(str(path / 'checkpoints' / 'best'))})</p>\n{plots}\n"
            f"<h3>Command</h3>\n<pre>{html.escape(command)}</pre>\n"
            f"<h3>Environment</h3>\n<pre>{html.escape(json.dumps(environment, indent=1) if environment else '—')}</pre>\n"
            f"<h3>config.yaml</h3>\n<pre>{html.escape(yaml.safe_dump(recorded, sort_keys=False))}</pre>")


def evaluation_section(run: dict) -> str:
    """An evaluation run (`peftlab icl`): what it evaluated, its results.md tables and plots as written, its command
    and config.yaml."""
    results, config = run["results"], run["config"]
    facts = [(name, results[key]) for name, key in (
        ("task", "task"), ("model", "model"), ("trained run (adapter on)", "run"), ("split", "split"),
        ("examples", "examples"), ("demonstration seeds", "demo_seeds"), ("format", "format_name"),
        ("prompt format", "format"), ("verbalisers", "verbalizers"), ("chat template", "chat"),
        ("balanced demonstrations", "balanced"), ("context (tokens)", "context_tokens")) if results.get(key) not in (None, "")]
    seconds = sum(item.get("seconds", 0) for item in results.get("sets", []) if not item.get("reused"))
    facts.append(("scoring time", f"{seconds:.0f} s"))
    images = "".join(image(plot) for plot in evaluation_plots(run))
    environment = config.get("environment") or {}
    command = environment.get("command") or "(not recorded: written before icl runs recorded their command)"
    recorded = {key: value for key, value in config.items() if key not in ("environment", "adapter", "train")}
    return (f"<h2>{html.escape(KIND_TITLES[run['kind']])}: {html.escape(run['name'])}</h2>\n"
            f"<p class='note'>{html.escape(run['path'])}</p>\n{facts_table(facts)}\n"
            f"{markdown_tables(read_text(Path(run['path']) / RESULTS_TABLE, 'results table'))}\n{images}\n"
            f"<h3>Command</h3>\n<pre>{html.escape(command)}</pre>\n"
            f"<h3>config.yaml</h3>\n<pre>{html.escape(yaml.safe_dump(recorded, sort_keys=False))}</pre>")


def run_plots(run: dict, path: Path) -> str:
    """The run's loss and metric plots, drawn afresh from metrics.jsonl and steps.jsonl (a run written by an older
    peftlab has older plots on disk)."""
    rows, summary = run["rows"], run["summary"]
    # The task's own metrics (summary.json names them since DPO's rewards/*), else the ones peftlab labels.
    metrics = summary.get("metric_names") or [name for name in METRIC_LABELS
                                              if any(f"val_{name}" in row for row in rows)]
    steps = RunDir(path).read_steps() if (path / STEPS).is_file() else None
    best = (summary.get("best") or {}).get("step")
    with tempfile.TemporaryDirectory() as folder:
        title = run_title(run["name"], run["config"]["task"]["name"], method_label(run["config"]))
        written = plot_history(rows, Path(folder), title, metrics, summary.get("select_metric") or "loss", best, steps)
        return "".join(image(plot) for plot in written)


def evaluations_table(rows: list[dict], best_step: int | None) -> str:
    """A row per evaluation: step, epoch, losses and every numeric validation metric; the best row highlighted."""
    keys = ["step", "epoch", "train_loss", "val_loss"]
    keys += [key for key in dict.fromkeys(key for row in rows for key in row)
             if key.startswith("val_") and key not in keys and key != "val_examples_per_second"
             and all(isinstance(row.get(key), (int, float, type(None))) for row in rows)]
    keys += ["val_examples_per_second"]
    header = "".join(f"<th>{html.escape(key)}</th>" for key in keys)
    lines = []
    for row in rows:
        cells = "".join(_td(_cell(row.get(key)), escaped=True) for key in keys)
        lines.append(f"<tr{' class=best' if row.get('step') == best_step else ''}>{cells}</tr>")
    return f"<table><tr>{header}</tr>{''.join(lines)}</table>"


def facts_table(facts: list[tuple[str, str]]) -> str:
    rows = "".join(f"<tr><th>{html.escape(name)}</th>{_td(str(value))}</tr>" for name, value in facts)
    return f"<table>{rows}</table>"


def markdown_tables(text: str) -> str:
    """peftlab's markdown (tables and plain lines) as HTML."""
    out, table = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        if table:
            header, *body = [row for row in table if not all(set(cell) <= set("-: ") for cell in row)]
            out.append("<table><tr>" + "".join(f"<th>{html.escape(cell)}</th>" for cell in header) + "</tr>"
                       + "".join("<tr>" + "".join(_td(cell) for cell in row) + "</tr>" for row in body) + "</table>")
            table = []
        if line.strip() and not line.startswith("<!--"):
            out.append(f"<p>{html.escape(line.lstrip('# '))}</p>")
    return "\n".join(out)


def image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<img alt='{html.escape(path.name)}' title='{html.escape(path.name)}' src='data:image/png;base64,{data}'>"


def _td(text: str, escaped: bool = False) -> str:
    """A table cell; numbers (and "—") right-aligned."""
    number = bool(re.match(r"^[-+]?[\d—]", text))
    return f"<td{' class=number' if number else ''}>{text if escaped else html.escape(text)}</td>"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "—" if value is None else html.escape(str(value))

