"""`peftlab preferences`: preference pairs for DPO, built as in the DPO paper's controlled-sentiment experiment.

Prompts are the first 2-8 tokens of Rotten Tomatoes reviews (`review_prompts`); the policy (a model, or a trained
causal-LM run with its adapter on) samples `--samples` completions of each; a reward run scores each whole review,
prompt + completion (`reward_scores`: a classifier's P(positive), an instruct run's verbaliser probability of
"positive"); every two samples of a prompt with different rewards and different texts make a pair, the higher the
chosen one (`preference_pairs`). The file is written once, atomically, at the end: a rerun with the same settings
(seed, batch size) writes the same pairs, so an interrupted run is rerun, not resumed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import statistics
import time
from itertools import combinations
from pathlib import Path

from tqdm.auto import tqdm

from peftlab.commands.preference_options import PREFERENCE_SAMPLING
from peftlab.data.datasets import check_split
from peftlab.data.rotten_tomatoes import read_rotten_tomatoes
from peftlab.errors import PeftlabError
from peftlab.fileio import check_writable, write_text_atomic
from peftlab.generate import Completion, complete
from peftlab.models import load_model, resolve_device
from peftlab.options import apply_options, sampling_options
from peftlab.predict import LoadedRun, load_run
from peftlab.runs import RunDir
from peftlab.sampling import Sampling
from peftlab.workloads.loading import load_run as load_run_model

PROMPT_TOKENS = (2, 8)  # a prompt is the first 2..8 tokens of a review, uniformly drawn
POSITIVE = "positive"


def review_prompts(tokenizer, split: str, count: int, seed: int, data_dir=None) -> list[str]:
    """`count` distinct Rotten Tomatoes reviews of `split` chosen with `seed`, each cut to its first k tokens (k
    uniform in 2..8, drawn with the same seed; the whole review when it is shorter; a token more while the cut
    falls inside a character) and decoded back to text."""
    reviews = read_rotten_tomatoes(split, data_dir)
    if not 1 <= count <= len(reviews):
        raise PeftlabError(f"--prompts {count}: the Rotten Tomatoes {split} split has {len(reviews)} reviews. Fix: ask "
                           f"for 1 to {len(reviews)} prompts")
    generator = random.Random(seed)
    chosen = generator.sample(range(len(reviews)), count)
    prompts = []
    for index in chosen:
        ids = tokenizer(reviews[index].text, add_special_tokens=False)["input_ids"]
        length = generator.randint(*PROMPT_TOKENS)
        while tokenizer.decode(ids[:length]).endswith("\ufffd") and length < len(ids):
            length += 1  # a cut inside a character's bytes (an accented letter) keeps the whole character
        prompts.append(tokenizer.decode(ids[:length]))
    return prompts


def check_reward_run(run: LoadedRun) -> None:
    """A reward is a Rotten Tomatoes run whose predictions carry the probability of a "positive" label (a
    classifier, an instruct run, a distilled student); anything else is refused before any sampling."""
    if run.config.task.name != "rotten_tomatoes":
        raise PeftlabError(f"--reward {run.path}: a {run.config.task.name} run; the reward is the probability of "
                           "'positive' from a Rotten Tomatoes run. Fix: train one, e.g. `peftlab train --task "
                           "rotten_tomatoes --objective classification`")
    try:
        record = run.predict(["a film ."], batch_size=1)[0]
    except PeftlabError as error:
        raise PeftlabError(f"--reward {run.path}: its runs give no label probabilities ({error}). Fix: a Rotten "
                           "Tomatoes classification or instruct run") from None
    if POSITIVE not in record.get("label_names", ()):
        raise PeftlabError(f"--reward {run.path}: its predictions have no '{POSITIVE}' label (labels: "
                           f"{record.get('label_names')}). Fix: a Rotten Tomatoes classification or instruct run")


def reward_scores(run: LoadedRun, texts: list[str], batch_size: int | None = None) -> list[float]:
    """The reward run's probability of "positive" for each text, in order (its own `predict` probabilities)."""
    records = run.predict(texts, batch_size)
    return [record["probabilities"][record["label_names"].index(POSITIVE)] for record in records]


def preference_pairs(prompt: str, completions: list[Completion], rewards: list[float]) -> list[dict]:
    """Every two completions of `prompt` with different rewards and different texts, the higher-scored chosen, in
    the order of the samples; equal rewards and identical texts carry no preference and make no pair. Each
    completion that did not end with EOS (cut at --max-new-tokens) is marked `*_truncated`, so DPO trains no EOS
    after it."""
    pairs = []
    for first, second in combinations(range(len(completions)), 2):
        if rewards[first] == rewards[second] or completions[first].text == completions[second].text:
            continue
        chosen, rejected = (first, second) if rewards[first] > rewards[second] else (second, first)
        pairs.append({"prompt": prompt, "chosen": completions[chosen].text, "rejected": completions[rejected].text,
                      "chosen_score": rewards[chosen], "rejected_score": rewards[rejected],
                      "chosen_truncated": not completions[chosen].ended,
                      "rejected_truncated": not completions[rejected].ended})
    return pairs


def load_policy(name: str, checkpoint: str, device: str | None):
    """(model, tokenizer) of the policy: a trained causal-LM run with its adapter on, or a model name or directory
    (as `peftlab generate --model` takes). `device`: instead of the run's config.yaml's."""
    if (Path(name) / "config.yaml").is_file():
        config = RunDir(name).read_config()
        config.train.device = device or config.train.device
        _, task, model = load_run_model(name, checkpoint, config)
        if task.model_task != "causal-lm":
            raise PeftlabError(f"--policy {name}: a {task.model_task} run; the policy generates text, so it is a "
                               "language model or a causal-LM run (lm, instruct, qa)")
        return model.eval(), task.tokenizer
    torch_device, dtype = resolve_device(device or "auto")
    model, tokenizer = load_model(name, dtype=dtype)
    return model.to(torch_device).eval(), tokenizer


def sampled_settings(args: argparse.Namespace, why_not_greedy: str) -> Sampling:
    """The sampling settings of a command that needs samples (preferences, frontier): its defaults, the options
    given, checked; greedy decoding is refused with `why_not_greedy`."""
    sampling = Sampling(**PREFERENCE_SAMPLING)
    apply_options(sampling, args, sampling_options())
    sampling.check()
    if sampling.greedy:
        raise PeftlabError(f"--temperature 0: {why_not_greedy}")
    return sampling


def run_preferences(args: argparse.Namespace) -> None:
    sampling = sampled_settings(args, "greedy decoding gives every sample of a prompt the same text, so no pair. "
                                      "Fix: sample with --temperature > 0")
    if args.samples < 2 or args.batch_size < 1:
        raise PeftlabError(f"--samples must be >= 2 (a pair needs two; got {args.samples}) and --batch-size >= 1 "
                           f"(got {args.batch_size})")
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise PeftlabError(f"{output} exists; nothing was written. Fix: choose another --output, or add --overwrite "
                           "to replace it")
    check_writable(output)
    check_split("rotten_tomatoes", args.split, args.data_dir)  # before any model loads
    started = time.perf_counter()
    reward = load_run(args.reward, args.checkpoint, args.device)
    check_reward_run(reward)  # before the policy samples anything
    model, tokenizer = load_policy(args.policy, args.checkpoint, args.device)
    prompts = review_prompts(tokenizer, args.split, args.prompts, sampling.seed, args.data_dir)
    pairs, rewards, empty = sample_pairs(model, tokenizer, reward, prompts, sampling, args.samples, args.batch_size)
    write_text_atomic(output, "".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs))
    print(summary_line(len(prompts), len(rewards), empty, pairs, rewards, time.perf_counter() - started, output))


def sample_pairs(model, tokenizer, reward: LoadedRun, prompts: list[str], sampling: Sampling, samples: int,
                 batch_size: int) -> tuple[list[dict], list[float], int]:
    """(the pairs, every sample's reward, how many completions were empty) of `samples` completions per prompt,
    `batch_size` prompts sampled and scored together, with a progress bar."""
    pairs, rewards, empty = [], [], 0
    with tqdm(total=len(prompts), desc="preferences", unit="prompt", dynamic_ncols=True, mininterval=2.0) as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            # One seed per chunk of prompts: the same seed and batch size give the same file.
            completions = complete(model, tokenizer, chunk, dataclasses.replace(sampling, seed=sampling.seed + start),
                                   samples)
            reviews = [prompt + sample.text for prompt, drawn in zip(chunk, completions) for sample in drawn]
            scores = reward_scores(reward, reviews, samples * len(chunk))
            for number, (prompt, drawn) in enumerate(zip(chunk, completions)):
                own = scores[number * samples : (number + 1) * samples]
                kept = [index for index, sample in enumerate(drawn) if sample.text.strip()]  # an empty one: no review
                pairs += preference_pairs(prompt, [drawn[index] for index in kept], [own[index] for index in kept])
                rewards += own
                empty += len(drawn) - len(kept)
            bar.update(len(chunk))
    return pairs, rewards, empty


def summary_line(prompts: int, samples: int, empty: int, pairs: list[dict], rewards: list[float], seconds: float,
                 output: Path) -> str:
    """What was built: counts, the reward spread over every sample, and the mean chosen - rejected gap."""
    spread = statistics.pstdev(rewards) if len(rewards) > 1 else 0.0
    gap = statistics.fmean(pair["chosen_score"] - pair["rejected_score"] for pair in pairs) if pairs else math.nan
    return (f"{len(pairs)} pairs from {prompts} prompts x {samples // prompts} samples ({empty} empty completions, "
            f"not paired); reward mean {statistics.fmean(rewards):.4f}, std {spread:.4f}, min {min(rewards):.4f}, "
            f"max {max(rewards):.4f}; mean chosen - rejected {gap:.4f}; {seconds:.1f} s: {output}")
