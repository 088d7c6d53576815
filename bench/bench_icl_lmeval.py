"""In-context learning against lm-evaluation-harness itself: the same k-shot prompts scored by `peftlab icl` and by
lm-eval 0.4.13's HF model class on the same local SmolLM2-135M directory; per-example log-likelihoods, acc and
acc_norm compared, and each side's wall time (a whole command each: start, model load, scoring), sides alternating.

    make bench-peers     # once: .venv-peers with lm-eval==0.4.13 and trl==1.16.0 beside peftlab (same torch)
    PEFTLAB_DATA=../shared/data .venv-peers/bin/python bench/bench_icl_lmeval.py [--shots 0,8] [--limit 200]
        [--repeats 2]

Rotten Tomatoes test split (--limit N evenly spaced reviews, as `peftlab icl --limit` picks them), lm-eval's own
sentiment format (its sst2 task: "{sentence}\\nQuestion: Is this sentence positive or negative?\\nAnswer:", choices
negative/positive, target delimiter " ", demonstrations joined by a blank line). Our side: `peftlab icl --format
lm-eval --demo-seeds 1` (seed 0's demonstrations). lm-eval's side: a task YAML over local JSON files written to a
temporary folder: the evaluated reviews, and as its few-shot split exactly our seed-0 demonstrations in our order
(sampler first_n), so both sides read the same prompts. Writes bench/results/icl_lmeval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "icl_lmeval.json"
ROOT = Path(__file__).resolve().parent.parent
TASK_YAML = """task: peftlab_rt
dataset_path: json
dataset_kwargs:
  data_files:
    train: {train}
    test: {test}
output_type: multiple_choice
training_split: train
test_split: test
fewshot_split: train
fewshot_config:
  sampler: first_n
doc_to_text: "{{{{sentence}}}}\\nQuestion: Is this sentence positive or negative?\\nAnswer:"
doc_to_target: label
doc_to_choice: ["negative", "positive"]
target_delimiter: " "
fewshot_delimiter: "\\n\\n"
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""
LM_EVAL_SIDE = """
import json, sys
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
folder, shots, model_dir, batch = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
lm = HFLM(pretrained=model_dir, dtype="float32", device="cpu", batch_size=batch)
out = simple_evaluate(model=lm, tasks=["peftlab_rt"], num_fewshot=shots, task_manager=TaskManager(include_path=folder),
                      log_samples=True, bootstrap_iters=0)
samples = sorted(out["samples"]["peftlab_rt"], key=lambda s: s["doc_id"])
metrics = out["results"]["peftlab_rt"]
json.dump({"loglikelihoods": [[r[0][0] for r in s["resps"]] for s in samples],
           "acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"],
           "contexts": [s["arguments"][0][0] for s in samples[:1]]}, open(folder + "/lm_eval_out.json", "w"))
"""


def timed(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def ours(shots: int, limit: int, folder: Path, env: dict) -> tuple[float, Path]:
    output = folder / f"ours-{shots}"
    command = [str(ROOT / ".venv-peers" / "bin" / "peftlab"), "icl", "--task", "rotten_tomatoes", "--split", "test",
               "--limit", str(limit), "--shots", str(shots), "--demo-seeds", "1", "--format", "lm-eval",
               "--output-dir", str(output)]
    if output.exists():
        subprocess.run(["rm", "-rf", str(output)], check=True)
    return timed(command, env), output


def lm_eval_data(our_run: Path, shots: int, folder: Path) -> Path:
    """The reviews our run evaluated (in its order) and its demonstrations, as lm-eval's local JSON task."""
    from peftlab.workloads.icl.evaluation import read_examples
    from peftlab.workloads.icl.templates import resolve_format

    prompt_format = resolve_format("rotten_tomatoes", "lm-eval", None, 2, chat=False)
    results = json.loads((our_run / "results.json").read_text())
    records = [json.loads(line) for line in (our_run / "predictions.jsonl").read_text().splitlines()]
    by_origin = {e.origin: e for split in ("train", "test")
                 for e in read_examples("rotten_tomatoes", split, os.environ.get("PEFTLAB_DATA"), prompt_format)}
    task = folder / f"task-{shots}"
    task.mkdir(exist_ok=True)
    write = lambda name, origins: (task / name).write_text("".join(
        json.dumps({"sentence": by_origin[o].fields["text"], "label": by_origin[o].label}) + "\n" for o in origins))
    demonstrations = results["sets"][0]["demonstrations"] or [records[0]["origin"]]  # 0 shots: any row will do
    write("train.jsonl", demonstrations)
    write("test.jsonl", [record["origin"] for record in records])
    (task / "peftlab_rt.yaml").write_text(TASK_YAML.format(train=task / "train.jsonl", test=task / "test.jsonl"))
    return task


def lm_eval(task: Path, shots: int, batch: int, env: dict) -> float:
    from peftlab.catalog import smollm2_cache_path

    side = [str(ROOT / ".venv-peers" / "bin" / "python"), "-c", LM_EVAL_SIDE, str(task), str(shots),
            str(smollm2_cache_path()), str(batch)]
    return timed(side, env)


def compare(our_run: Path, task: Path) -> dict:
    ours_records = [json.loads(line) for line in (our_run / "predictions.jsonl").read_text().splitlines()]
    summary = json.loads((our_run / "results.json").read_text())["sets"][0]["metrics"]
    theirs = json.loads((task / "lm_eval_out.json").read_text())
    differences = [abs(a - b) for record, row in zip(ours_records, theirs["loglikelihoods"])
                   for a, b in zip(record["loglikelihoods"], row)]
    return {"examples": len(ours_records), "max_abs_loglikelihood_difference": max(differences),
            "ours_acc": summary["raw"]["accuracy"], "lm_eval_acc": theirs["acc"],
            "ours_acc_norm": summary["norm"]["accuracy"], "lm_eval_acc_norm": theirs["acc_norm"],
            "lm_eval_first_context_tail": theirs["contexts"][0][-200:]}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shots", default="0,8", help="comma-separated k, each compared")
    parser.add_argument("--limit", type=int, default=200, help="evenly spaced RT test reviews")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="lm-eval's batch size (ours: --batch-size 32)")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    if not (ROOT / ".venv-peers" / "bin" / "lm-eval").exists():
        sys.exit("lm-eval is not installed in .venv-peers: run `make bench-peers` first")
    env = dict(os.environ, TQDM_DISABLE="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        for shots in [int(k) for k in args.shots.split(",")]:
            ours_seconds, lm_eval_seconds, task = [], [], None
            for repeat in range(args.repeats):  # sides alternate
                seconds, our_run = ours(shots, args.limit, folder, env)
                ours_seconds.append(seconds)
                task = task or lm_eval_data(our_run, shots, folder)
                lm_eval_seconds.append(lm_eval(task, shots, args.batch_size, env))
                print(f"k={shots} repeat {repeat}: peftlab icl {seconds:.1f} s, lm-eval {lm_eval_seconds[-1]:.1f} s",
                      flush=True)
            row = {"shots": shots, **compare(our_run, task), "peftlab_seconds": spread(ours_seconds),
                   "lm_eval_seconds": spread(lm_eval_seconds),
                   "speedup": statistics.median(lm_eval_seconds) / statistics.median(ours_seconds)}
            print(json.dumps({key: value for key, value in row.items() if "context" not in key}), flush=True)
            rows.append(row)
    result = {"bench": "icl vs lm-evaluation-harness", "limit": args.limit, "repeats": args.repeats,
              "machine": platform.processor() or platform.machine(), "threads": os.environ.get("OMP_NUM_THREADS"),
              "rows": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
