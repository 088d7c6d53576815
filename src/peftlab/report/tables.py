"""Reading runs for comparison and the markdown tables of `peftlab report` (a row per run, or per method across
task sweeps)."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from peftlab.errors import PeftlabError
from peftlab.peft.methods import METHODS, method_for
from peftlab.fileio import read_text
from peftlab.runs import CONFIG, METRICS, STEPS, SUMMARY, RunDir

# An evaluation run (`peftlab icl`) trains nothing: its results.json says what it is ("kind") and holds its numbers,
# results.md its tables and plots/*.png its figures; reports show those as they are.
RESULTS, RESULTS_TABLE = "results.json", "results.md"
KIND_TITLES = {"icl": "In-context learning"}


def read_run(run_dir: str | Path, error: str | None = None) -> dict:
    """A finished, interrupted or failed run's config (as a dict), history and summary (if written yet), for
    comparison; `error`: why it failed, when known (a sweep's point). A run directory without results (config.yaml
    only: the run failed, or was stopped, before its first evaluation) has no rows; its `status` says so."""
    run = RunDir(run_dir)
    if not (run.path / CONFIG).is_file():
        raise PeftlabError(f"{run} is not a run directory (expected {CONFIG}, and {METRICS} once it has results)")
    config = run.read_config()
    results = read_results(run.path)
    if results is not None:
        return {"name": run.path.name, "path": str(run), "config": config.to_dict(), "kind": results["kind"],
                "results": results, "status": "finished"}
    summary = run.read_summary() if (run.path / SUMMARY).is_file() else {}
    rows = run.read_metrics() if (run.path / METRICS).is_file() else []
    read = {"name": run.path.name, "path": str(run), "config": config.to_dict(), "rows": rows, "summary": summary,
            "last_step": _last_step(run.path / STEPS)}
    if student_of(read["config"]):
        read["teacher_total"] = _teacher_total(read["config"])
    return read | {"status": run_status(read, error)}


def read_results(run_dir: Path) -> dict | None:
    """An evaluation run's results.json (one whose "kind" a report knows), else None (a training run)."""
    path = Path(run_dir) / RESULTS
    if not path.is_file():
        return None
    try:
        results = json.loads(read_text(path, "results"))
    except json.JSONDecodeError as error:
        raise PeftlabError(f"{path} is not valid JSON ({error}). Fix: run the evaluation again into a new "
                           "--output-dir") from None
    return results if isinstance(results, dict) and results.get("kind") in KIND_TITLES else None


def evaluation_text(run: dict) -> str:
    """An evaluation run's results.md under a heading naming the run (its own headings one level down)."""
    table = Path(run["path"]) / RESULTS_TABLE
    body = read_text(table, "results table") if table.is_file() else "(results.md is missing)\n"
    body = "\n".join("##" + line if line.startswith("#") else line for line in body.splitlines())
    return f"\n## {KIND_TITLES[run['kind']]}: {run['name']} ({run['path']})\n\n{body}\n"


def evaluation_plots(run: dict) -> list[Path]:
    return sorted((Path(run["path"]) / "plots").glob("*.png"))


def _last_step(path: Path) -> int | None:
    """The last optimizer step steps.jsonl records (a line cut short by a kill is skipped), or None."""
    if not path.is_file():
        return None
    for line in reversed(read_text(path, "steps file").splitlines()):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def finished(run: dict) -> bool | None:
    """Whether the run did all it planned (summaries before `finished` existed: all its epochs); None without a
    summary."""
    summary = run["summary"]
    if not summary:
        return None
    return summary.get("finished", summary.get("epochs_completed") == run["config"]["train"]["epochs"])


def run_status(run: dict, error: str | None = None) -> str:
    """finished | unfinished at step N (killed or stopped: no summary, or one that says it did not finish; resumable)
    | failed: <error> (a sweep's point that raised) | failed (no results) (config.yaml only)."""
    if error:
        return f"failed: {' '.join(error.split())}"
    if finished(run):
        return "finished"
    if not run["rows"] and not run["summary"]:
        return "failed (no results)"
    step = run["summary"].get("steps_completed") or run.get("last_step") or (run["rows"][-1]["step"] if run["rows"]
                                                                            else 0)
    return f"unfinished at step {step}"


def _number(value, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def method_settings(adapter: dict) -> str:
    """A run's method and its shape settings in a few characters, as the method describes itself
    (`AdapterMethod.describe`, e.g. "lora r16 α32 all-linear", "prefix p10"); a method no longer registered shows
    its name, so a report of old runs still renders."""
    if adapter["method"] not in METHODS:
        return adapter["method"]
    method = method_for(adapter)
    return method.describe(method.settings(adapter))


def student_of(config: dict) -> str | None:
    """The student type of a distilled run (its `distill` section), else None: a student is a small network of its
    own, not the model fine-tuned with the adapter section's method (which reads "full")."""
    return (config.get("distill") or {}).get("student")


def method_label(config: dict) -> str:
    """What a run trains, for tables and plots: "lstm student" for a distilled student, else `method_settings`."""
    student = student_of(config)
    return f"{student} student" if student else method_settings(config["adapter"])


def _teacher_total(config: dict) -> int | None:
    """A distilled student's teacher's parameter count (its summary.json), the size a student is compared with."""
    teacher = (config.get("distill") or {}).get("teacher")
    summary = Path(teacher or "") / SUMMARY
    if not teacher or not summary.is_file():
        return None
    try:
        return RunDir(teacher).read_summary().get("parameters", {}).get("total")
    except PeftlabError:
        return None  # an unreadable teacher summary leaves the share unknown, not the report unwritten


def run_numbers(run: dict) -> dict:
    """What the tables compare of one run: its selection metric, best validation score, test score (None when not
    tested), trainable parameters and their share of the model, seconds per training epoch (mean), validation
    examples/s (median over evaluations)."""
    config, summary, rows = run["config"], run["summary"], run["rows"]
    metric = summary.get("select_metric") or config["train"].get("select_metric") or "accuracy"
    val_scores = [row[f"val_{metric}"] for row in rows if row.get(f"val_{metric}") is not None]
    parameters = summary.get("parameters", {})
    epochs = [row["train_seconds"] for row in rows if row.get("final_of_epoch") and "train_seconds" in row]
    speeds = [row["val_examples_per_second"] for row in rows if row.get("val_examples_per_second")]
    trainable, total = parameters.get("trainable"), parameters.get("total")
    if student_of(config):  # a student is all trainable: its size is worth knowing against its teacher's
        total = run.get("teacher_total")
    return {
        "metric": metric,
        "best_val": (min if metric == "loss" else max)(val_scores) if val_scores else None,
        "best_val_loss": min((row["val_loss"] for row in rows if row.get("val_loss") is not None), default=None),
        "test": (summary.get("test") or {}).get(metric),
        "test_split": (summary.get("test") or {}).get("split"),
        "trainable": trainable,
        "share": trainable / total if trainable and total else None,
        "seconds_per_epoch": statistics.fmean(epochs) if epochs else None,
        "eval_per_second": statistics.median(speeds) if speeds else None,
    }


def _cell_text(text: str) -> str:
    """Free text (an error message) as one markdown table cell."""
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= 160 else text[:159] + "…"


def count_text(value) -> str:
    return "—" if value is None else f"{value:,}"


def _share(value, run: dict | None = None) -> str:
    """The trainable share of the model; a student's is of its teacher's size."""
    if value is None:
        return "—"
    return f"{100 * value:.3g}%" + (" of teacher" if run and student_of(run["config"]) else "")


def runs_table(runs: list[dict]) -> str:
    """One markdown table: a row per run with its method, size, best validation numbers, test score and speed."""
    lines = ["| run | method | trainable params | % of model | best val loss | best val (metric) | "
             "test (split, metric) | s / epoch | val examples/s | status |", "|---" * 10 + "|"]
    for run in runs:
        numbers = run_numbers(run)
        metric = numbers["metric"]
        test_text = (f"{_number(numbers['test'])} ({numbers['test_split']}, {metric})"
                     if numbers["test_split"] else "—")
        lines.append(
            f"| {run['name']} | {method_label(run['config'])} | {count_text(numbers['trainable'])} | "
            f"{_share(numbers['share'], run)} | {_number(numbers['best_val_loss'])} | {_number(numbers['best_val'])} "
            f"({metric}) | {test_text} | {_number(numbers['seconds_per_epoch'], 0)} | "
            f"{_number(numbers['eval_per_second'], 1)} | {_cell_text(run.get('status', '—'))} |"
        )
    return "\n".join(lines) + "\n"


def score_of(run: dict) -> tuple[float | None, str]:
    """The score a comparison plots: the test score when the run was tested, else its best validation score."""
    numbers = run_numbers(run)
    if numbers["test"] is not None:
        return numbers["test"], f"test {numbers['metric']}"
    return numbers["best_val"], f"best validation {numbers['metric']}"


SEED_SUFFIX = re.compile(r"_seed\d+$")  # lora, lora_seed1, lora_seed2: one method, three seeds


def method_name(run: dict) -> str:
    return SEED_SUFFIX.sub("", run["name"])


def scores_of(runs: list[dict]) -> list[float]:
    return [score for score, _ in map(score_of, runs) if score is not None]


def _score_cell(runs: list[dict]) -> str:
    """One run's score, or mean ± sample std over the seeds of a method."""
    scores = scores_of(runs)
    if len(scores) < 2:
        return _number(scores[0]) if scores else "—"
    return f"{statistics.fmean(scores):.4f} ± {statistics.stdev(scores):.4f} ({len(scores)} seeds)"


def _median_of(runs: list[dict], key: str):
    values = [value for value in (run_numbers(run)[key] for run in runs) if value is not None]
    return statistics.median(values) if values else None


def methods_table(tasks: dict[str, list[dict]]) -> str:
    """A row per method across task sweeps, fewest trainable parameters first (runs of the same name;
    `<name>_seed<k>` runs are more seeds of `<name>`): size, each task's score (test when tested, else best validation; mean ± std over seeds), and the
    median seconds per epoch and validation examples/s per task."""
    names = list(dict.fromkeys(method_name(run) for runs in tasks.values() for run in runs))
    size = {name: run_numbers(run)["trainable"] or 0 for runs in tasks.values() for run in runs[::-1]
            for name in [method_name(run)]}
    names.sort(key=lambda name: size[name])  # smallest first: size against quality reads down the table
    by_task = {task: {name: [run for run in runs if method_name(run) == name] for name in names}
               for task, runs in tasks.items()}
    header = ["run", "method", "trainable params", "% of model"]
    header += [f"{task} {score_of(runs[0])[1]}" for task, runs in tasks.items()]
    header += [f"{task} {what}" for task in tasks for what in ("s / epoch", "val examples/s")]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name in names:
        first = next(group[0] for groups in by_task.values() for group in [groups[name]] if group)
        numbers = run_numbers(first)
        cells = [name, method_label(first["config"]), count_text(numbers["trainable"]),
                 _share(numbers["share"], first)]
        cells += [_score_cell(groups[name]) for groups in by_task.values()]
        for groups in by_task.values():
            cells += [_number(_median_of(groups[name], "seconds_per_epoch"), 0),
                      _number(_median_of(groups[name], "eval_per_second"), 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
