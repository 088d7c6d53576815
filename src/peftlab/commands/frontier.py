"""`peftlab frontier`: the reward-KL frontier of DPO runs, as in the DPO paper's controlled-sentiment experiment.

Held-out prompts are the first 2-8 tokens of Rotten Tomatoes test reviews (`preferences.review_prompts`, seeded).
Each policy samples completions (`evaluate_policy`); every prompt + completion is scored by the reward run (its
P(positive), `preferences.reward_scores`) and every completion's KL(π‖π_ref) is measured against the run's own
reference (`workloads.dpo.kl.sequence_kl`, with `workloads.dpo.reference.reference_model`: its adapter disabled, or
its --init-from run's adapter). Points of the frontier:

- the reference itself: KL 0 (by definition, not measured), its mean reward;
- best-of-N sampling from the reference: the highest reward of N samples, its expectation estimated over every
  N-subset of the reference's samples of a prompt (`expected_best_of`); its KL is the analytic bound
  log N - (N-1)/N (Stiennon et al. 2020), not a measurement;
- each DPO run: mean reward and mean sequence KL.

Means are over prompts (each prompt's mean over its samples), ± the standard deviation of those per-prompt means.
Writes frontier.json ("kind": "frontier"), frontier.md (the table), frontier.png and samples.jsonl (every completion
with its reward and KL) into --output-dir, replaced whole (`fileio.replace_directory`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tqdm.auto import tqdm

from peftlab.commands.preferences import (check_reward_run, load_policy, review_prompts, reward_scores,
                                          sampled_settings)
from peftlab.data.datasets import objective_of
from peftlab.errors import PeftlabError
from peftlab.fileio import check_writable, finite_or_null, replace_directory, write_json_lines, write_text_atomic
from peftlab.generation import decode, token_picker
from peftlab.models import load_tokenizer
from peftlab.predict import load_run
from peftlab.report import save_figure
from peftlab.runs import CONFIG, SUMMARY, RunDir
from peftlab.sampling import Sampling
from peftlab.workloads.dpo.kl import ReferenceFactory, sequence_kl
from peftlab.workloads.dpo.reference import reference_model
from peftlab.workloads.loading import load_run as load_run_model

RESULTS, TABLE, PLOT, SAMPLES = "frontier.json", "frontier.md", "frontier.png", "samples.jsonl"
PROMPT_SPLIT = "test"  # held out: the preference pairs come from the train split
KL_NOTE = {"reference": "0: the reference itself", "best-of-n": "analytic bound log N - (N-1)/N, not measured",
           "dpo": "measured: Σ over the sampled tokens of the full next-token distributions' KL"}
Reward = Callable[[list[str]], list[float]]  # prompt + completion texts -> rewards, in order


# ----------------------------------------------------------------------------------------------------------
# Measuring one policy


def evaluate_policy(model, tokenizer, prompts: Sequence[str], reward: Reward, sampling: Sampling, samples: int,
                    reference: ReferenceFactory | None, batch_size: int, bar: tqdm | None = None) -> dict:
    """Sample `samples` completions of each prompt from `model` (one stream seeded by `sampling.seed`: the same seed
    and batch size give the same completions), score each prompt + completion with `reward` and, against `reference`
    (None: the model is the reference, KL 0), measure its sequence KL. Returns the summary (`summarize`) with
    "records", one per completion (its text and token ids, reward, KL and log-ratio)."""
    prompt_ids = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    rows = [index for index in range(len(prompts)) for _ in range(samples)]  # prompt-major
    pick_next = token_picker(sampling)
    records = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        batch_prompts = [prompt_ids[index] for index in batch]
        completions = decode(model, batch_prompts, sampling.max_new_tokens, {tokenizer.eos_token_id},
                             tokenizer.pad_token_id, pick_next, stop_strings=sampling.stop,
                             detokenize=lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True))
        if reference is None:
            kl = log_ratio = [0.0] * len(batch)
        else:
            estimates = sequence_kl(model, reference, batch_prompts, completions, tokenizer.pad_token_id,
                                    sampling.temperature)
            kl, log_ratio = estimates.kl.tolist(), estimates.log_ratio.tolist()
        texts = [tokenizer.decode(completion, skip_special_tokens=True) for completion in completions]
        rewards = reward([prompts[index] + text for index, text in zip(batch, texts)])
        records += [{"prompt": index, "completion": text, "completion_ids": completion, "tokens": len(completion),
                     "reward": float(score), "kl": value, "log_ratio": ratio}
                    for index, text, completion, score, value, ratio in zip(batch, texts, completions, rewards, kl,
                                                                              log_ratio)]
        if bar is not None:
            bar.update(len(batch))
    return summarize(records) | {"records": records}


def summarize(records: list[dict]) -> dict:
    """Mean and std over prompts (of each prompt's mean over its samples) of reward, KL and log-ratio."""
    summary = {"prompts": len({record["prompt"] for record in records}), "samples": len(records),
               "tokens_mean": statistics.fmean(record["tokens"] for record in records)}
    for key in ("reward", "kl", "log_ratio"):
        summary[f"{key}_mean"], summary[f"{key}_std"] = over_prompts(records, statistics.fmean, key)
    return summary


def over_prompts(records: list[dict], per_prompt: Callable[[list[float]], float],
                 key: str = "reward") -> tuple[float, float]:
    """(mean, sample std) over prompts of `per_prompt` applied to each prompt's values of `key` (std 0: one prompt)."""
    by_prompt: dict[int, list[float]] = {}
    for record in records:
        by_prompt.setdefault(record["prompt"], []).append(record[key])
    values = [per_prompt(group) for group in by_prompt.values()]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def expected_best_of(rewards: Sequence[float], n: int) -> float:
    """The reward of best-of-n sampling, estimated from m >= n samples of one prompt: the mean, over every n-subset,
    of its highest reward (unbiased for E[max of n draws]). The i-th smallest reward (from 0) is the highest of the
    C(i, n-1) subsets that take it and n-1 smaller ones."""
    ordered = sorted(rewards)
    if not 1 <= n <= len(ordered):
        raise ValueError(f"best-of-{n} needs at least {n} samples, got {len(ordered)}")
    return sum(math.comb(index, n - 1) * value for index, value in enumerate(ordered)) / math.comb(len(ordered), n)


def best_of_kl_bound(n: int) -> float:
    """KL(best-of-n ‖ reference) <= log n - (n-1)/n, equal when no two samples tie (Stiennon et al. 2020)."""
    return math.log(n) - (n - 1) / n


# ----------------------------------------------------------------------------------------------------------
# The points of the frontier


def reference_points(result: dict, name: str, best_of: Sequence[int]) -> list[dict]:
    """The reference (KL 0) and best-of-N sampling from it, from one `evaluate_policy` of the reference."""
    points = [point(name, "reference", result)]
    for n in best_of:
        mean, std = over_prompts(result["records"], lambda rewards, n=n: expected_best_of(rewards, n))
        points.append({"policy": f"best-of-{n}", "kind": "best-of-n", "n": n, "reward_mean": mean, "reward_std": std,
                       "kl_mean": best_of_kl_bound(n), "kl_std": None, "prompts": result["prompts"],
                       "samples": result["samples"], "kl_is": KL_NOTE["best-of-n"]})
    return points


def point(name: str, kind: str, result: dict, beta: float | None = None, steps: int | None = None) -> dict:
    """One policy's point: its summary without the records."""
    summary = {key: value for key, value in result.items() if key != "records"}
    return {"policy": name, "kind": kind, "beta": beta, "steps": steps, **summary, "kl_is": KL_NOTE[kind]}


# ----------------------------------------------------------------------------------------------------------
# Outputs


def frontier_table(results: dict) -> str:
    """frontier.md: a row per point, then what the numbers are and the command that measured them."""
    title = (f"# Reward-KL frontier: {results['prompts']} Rotten Tomatoes {results['split']} prompts, reward "
             f"{results['reward_run']}")
    lines = [title, "", "| policy | β | steps | mean reward ± std | KL (nats) ± std | samples |",
             "|---|---:|---:|---:|---:|---:|"]
    for item in results["points"]:
        lines.append(f"| {item['policy']} | {number(item.get('beta'))} | {number(item.get('steps'))} | "
                     f"{item['reward_mean']:.4f} ± {item['reward_std']:.4f} | {kl_cell(item)} | {item['samples']} |")
    notes = (f"Reference: {results['reference']}. ± is the standard deviation over prompts of each prompt's mean over "
             f"its samples. KL: per DPO run against its own reference, {KL_NOTE['dpo']}, at temperature "
             f"{results['sampling']['temperature']:g}; best-of-N: the {KL_NOTE['best-of-n']}; its reward is the "
             "expected best of N over every N-subset of the reference's samples of a prompt.")
    return "\n".join(lines + ["", notes, "", f"Command: `{results['command']}`", ""])


def kl_cell(item: dict) -> str:
    if item["kind"] == "reference":
        return "0 (itself)"
    if item["kind"] == "best-of-n":
        return f"≤ {item['kl_mean']:.3f} (bound)"
    return f"{item['kl_mean']:.3f} ± {item['kl_std']:.3f}"


def number(value) -> str:
    return "—" if value is None else f"{value:g}"


def plot_frontier(results: dict, path: Path) -> Path:
    """Mean reward against KL: the reference at 0, best-of-N on the analytic bound, DPO runs coloured by β
    (± std over prompts as error bars), the command underneath."""
    figure, axes = plt.subplots(figsize=(7.5, 5.2), dpi=110)
    points = results["points"]
    for item in (p for p in points if p["kind"] == "reference"):
        axes.errorbar([0.0], [item["reward_mean"]], yerr=[item["reward_std"]], fmt="*", markersize=14, color="black",
                      capsize=3, label=f"reference ({item['policy']})", zorder=3)
    best = [p for p in points if p["kind"] == "best-of-n"]
    if best:
        axes.errorbar([p["kl_mean"] for p in best], [p["reward_mean"] for p in best],
                      yerr=[p["reward_std"] for p in best], fmt="s--", color="grey", capsize=3,
                      label="best-of-N from the reference (KL: analytic bound)")
        for item in best:
            axes.annotate(f"N={item['n']}", (item["kl_mean"], item["reward_mean"]), textcoords="offset points",
                          xytext=(5, -12), fontsize=8, color="grey")
    dpo = [p for p in points if p["kind"] == "dpo"]
    for beta in sorted({p["beta"] for p in dpo}, key=lambda value: (value is None, value)):
        group = sorted((p for p in dpo if p["beta"] == beta), key=lambda p: (p["steps"] or 0))
        axes.errorbar([p["kl_mean"] for p in group], [p["reward_mean"] for p in group],
                      xerr=[p["kl_std"] for p in group], yerr=[p["reward_std"] for p in group], fmt="o-", capsize=3,
                      label=f"DPO β={number(beta)}")
        for item in group:
            axes.annotate(item["policy"], (item["kl_mean"], item["reward_mean"]), textcoords="offset points",
                          xytext=(5, 5), fontsize=7)
    axes.set_xlabel("KL(π ‖ π_ref), nats per completion")
    axes.set_ylabel(f"mean reward ({results['reward_run']})")
    axes.set_title(f"Reward-KL frontier, {results['prompts']} RT {results['split']} prompts (± std over prompts)",
                   fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.text(0.01, 0.01, textwrap.fill(results["command"], 140), fontsize=6, color="0.4", va="bottom")
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    return save_figure(figure, path)


def write_frontier(directory: Path, results: dict, records: list[dict], overwrite: bool) -> Path:
    """The four files, swapped in whole; a folder that is not an earlier frontier is never replaced."""
    def fill(staging: Path) -> None:
        write_json_lines(staging / SAMPLES, records)
        write_text_atomic(staging / TABLE, frontier_table(results))
        plot_frontier(results, staging / PLOT)
        write_text_atomic(staging / RESULTS, json.dumps(finite_or_null(results), indent=1) + "\n")

    check_output(directory, overwrite)
    return replace_directory(directory, fill, RESULTS)


def check_output(directory: Path, overwrite: bool) -> None:
    """An existing folder with anything in it is refused unless --overwrite (and then only an earlier frontier, one
    holding frontier.json, is replaced: `replace_directory`)."""
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise PeftlabError(f"{directory} exists; nothing was written. Fix: choose another --output-dir, or add "
                           "--overwrite to replace an earlier frontier there")
    check_writable(directory / RESULTS)


# ----------------------------------------------------------------------------------------------------------
# The command


class DpoRun:
    """A DPO run as the frontier reads it before loading it: its config, β, steps trained and which reference."""

    def __init__(self, path: str):
        run = RunDir(path)
        self.path, self.name, self.config = path, run.path.name, run.read_config()
        objective = objective_of(self.config.task.name, self.config.task.objective)
        if objective != "dpo":
            raise PeftlabError(f"--runs {path}: a {self.config.task.name} run with objective {objective}, not a DPO "
                               "run. Fix: give runs of `peftlab train --task preferences` (objective dpo)")
        self.beta = self.config.dpo.beta
        summary = run.read_summary() if (run.path / SUMMARY).is_file() else {}
        self.steps = summary.get("steps_completed")
        init = self.config.train.init_from
        # Which reference the run trained against (`DPOWorkload.build_model` loads it the same way).
        self.reference = (str(RunDir(init).checkpoint(self.config.train.init_checkpoint).resolve()) if init
                          else f"{self.config.model.name} with the adapter disabled")

    def load(self, checkpoint: str, device: str | None):
        """(model in eval mode, a factory of its reference context)."""
        if device:
            self.config.train.device = device
        _, task, model = load_run_model(self.path, checkpoint, self.config)
        model.eval()
        return model, lambda: reference_model(model, task.reference_state)


def dpo_runs(paths: Sequence[str]) -> list[DpoRun]:
    """The runs of --runs: run directories, or folders of them (a sweep's: its subdirectories with a config.yaml)."""
    runs = []
    for path in map(Path, paths):
        if (path / CONFIG).is_file():
            runs.append(DpoRun(str(path)))
            continue
        children = sorted(child for child in path.iterdir() if (child / CONFIG).is_file()) if path.is_dir() else []
        if not children:
            raise PeftlabError(f"--runs {path}: neither a run directory (config.yaml) nor a folder of runs (a "
                               "sweep's). Fix: give DPO runs written by `peftlab train --task preferences`, or their "
                               "sweep folder")
        runs += [DpoRun(str(child)) for child in children]
    return runs


def frontier_sampling(args: argparse.Namespace) -> Sampling:
    """The sampling settings; the KL compares full next-token distributions, so nothing may truncate them."""
    sampling = sampled_settings(args, "greedy decoding has no distribution to measure a KL of, and best-of-N needs "
                                      "different samples. Fix: --temperature 1 (the models as they are)")
    if sampling.top_k != 0 or sampling.top_p != 1:
        raise PeftlabError(f"--top-k {sampling.top_k} --top-p {sampling.top_p}: the KL is between the models' full "
                           "next-token distributions, and a truncated one may sample a token the other cannot (an "
                           "infinite KL). Fix: --top-k 0 --top-p 1")
    return sampling


def parse_best_of(text: str) -> list[int]:
    try:
        values = sorted({int(item) for item in text.split(",") if item.strip()})
    except ValueError:
        values = []
    if not values or values[0] < 2:
        raise PeftlabError(f"--best-of {text}: expected comma-separated whole numbers >= 2, e.g. 2,4,8")
    return values


def check_counts(args: argparse.Namespace) -> None:
    for flag, value in (("--prompts", args.prompts), ("--samples", args.samples), ("--batch-size", args.batch_size)):
        if value < 1:
            raise PeftlabError(f"{flag} must be >= 1, got {value}")


def shared_reference(runs: list[DpoRun], reference: str | None) -> None:
    """Without --reference, the reference point is the runs' own reference, so they must share one model and one
    reference."""
    models = sorted({run.config.model.name for run in runs})
    if len(models) > 1:
        raise PeftlabError(f"--runs: the runs are on different models ({', '.join(models)}); a frontier compares "
                           "policies of one model. Fix: give runs of one model")
    references = sorted({run.reference for run in runs})
    if reference is None and len(references) > 1:
        raise PeftlabError(f"--runs: the runs have different references ({'; '.join(references)}), so there is no one "
                           "reference to draw at KL 0. Fix: give --reference MODEL_OR_RUN, or runs with one reference")


def run_frontier(args: argparse.Namespace) -> None:
    sampling = frontier_sampling(args)
    best_of = parse_best_of(args.best_of)
    check_counts(args)
    output = Path(args.output_dir)
    check_output(output, args.overwrite)
    runs = dpo_runs(args.runs)
    shared_reference(runs, args.reference)
    started = time.perf_counter()
    reward_run = load_run(args.reward, args.checkpoint, args.device)
    check_reward_run(reward_run)

    def reward(texts: list[str]) -> list[float]:
        return reward_scores(reward_run, texts, args.batch_size)

    tokenizer = load_tokenizer(runs[0].config.model.name)
    prompts = review_prompts(tokenizer, PROMPT_SPLIT, args.prompts, sampling.seed, args.data_dir)
    reference_samples = max(args.samples, *best_of)
    measure = {"tokenizer": tokenizer, "prompts": prompts, "reward": reward, "sampling": sampling,
               "batch_size": args.batch_size}
    points, records = [], []
    total = len(prompts) * (reference_samples + args.samples * len(runs))
    with tqdm(total=total, desc="frontier", unit="completion", dynamic_ncols=True, mininterval=2.0) as bar:
        if args.reference:
            model, reference_tokenizer = load_policy(args.reference, args.checkpoint, args.device)
            if reference_tokenizer.get_vocab() != tokenizer.get_vocab():
                raise PeftlabError(f"--reference {args.reference}: its tokenizer is not that of the runs' model "
                                   f"{runs[0].config.model.name}. Fix: a reference on the runs' model")
            result = evaluate_policy(model, samples=reference_samples, reference=None, bar=bar, **measure)
            del model
            points, records = reference_points(result, args.reference, best_of), labelled(args.reference, result)
        for run in runs:
            model, reference = run.load(args.checkpoint, args.device)
            if not points:  # the reference point: the first run's reference, which every run shares
                with reference():
                    result = evaluate_policy(model, samples=reference_samples, reference=None, bar=bar, **measure)
                points, records = reference_points(result, f"reference: {run.reference}", best_of), labelled(
                    "reference", result)
            result = evaluate_policy(model, samples=args.samples, reference=reference, bar=bar, **measure)
            points.append(point(run.name, "dpo", result, run.beta, run.steps))
            records += labelled(run.name, result)
            del model, reference
    results = {"kind": "frontier", "command": getattr(args, "command_line", None) or "peftlab frontier (from Python)",
               "reward_run": args.reward, "reference": args.reference or runs[0].reference, "split": PROMPT_SPLIT,
               "prompts": len(prompts), "prompt_seed": sampling.seed, "sampling": asdict(sampling),
               "samples_per_prompt": args.samples, "reference_samples_per_prompt": reference_samples,
               "best_of": best_of, "runs": [run.path for run in runs], "seconds": time.perf_counter() - started,
               "points": points}
    write_frontier(output, results, records, args.overwrite)
    print(frontier_table(results) + "\n" + "\n".join(f"wrote {output / name}" for name in (RESULTS, TABLE, PLOT,
                                                                                            SAMPLES))
          + f"\n{len(records)} completions in {results['seconds']:.0f} s")


def labelled(policy: str, result: dict) -> list[dict]:
    return [{"policy": policy, **record} for record in result["records"]]
