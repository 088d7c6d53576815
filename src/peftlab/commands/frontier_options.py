"""The command line of `peftlab frontier` (light: options only, so `peftlab --help` starts fast). It samples as
`peftlab preferences` does (`PREFERENCE_SAMPLING`: temperature 1, no truncation), so the KL it measures is that of
the models themselves."""

from __future__ import annotations

import argparse

from peftlab.commands.preference_options import PREFERENCE_SAMPLING
from peftlab.options import add_options, sampling_options

BEST_OF = (2, 4, 8)


def frontier_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reward", required=True, metavar="RUN_DIR",
                        help="a Rotten Tomatoes classification or instruct run: the reward is its P(positive)")
    parser.add_argument("--runs", required=True, nargs="+", metavar="RUN_DIR",
                        help="DPO runs (`peftlab train --task preferences`, objective dpo), or folders of them (a "
                        "sweep's), each run measured against its own reference")
    parser.add_argument("--reference", metavar="MODEL_OR_RUN",
                        help="the model drawn at KL 0 and best-of-N sampled from: a model name or directory, or a "
                        "causal-LM run (its adapter on) (default: the runs' own reference, which they must share)")
    parser.add_argument("--output-dir", required=True, metavar="DIR",
                        help="where frontier.json, frontier.md, frontier.png and samples.jsonl go")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier frontier in --output-dir")
    parser.add_argument("--prompts", type=int, default=128,
                        help="held-out prompts: the first 2-8 tokens of Rotten Tomatoes test reviews, drawn with "
                        "--seed (default: 128)")
    parser.add_argument("--samples", type=int, default=4, help="completions sampled per prompt from each run "
                        "(default: 4)")
    parser.add_argument("--best-of", default=",".join(map(str, BEST_OF)), metavar="N,N",
                        help="best-of-N sampling from the reference: keep the highest-reward of N samples (default: "
                        f"{','.join(map(str, BEST_OF))})")
    parser.add_argument("--batch-size", type=int, default=16, help="completions sampled together (default: 16)")
    parser.add_argument("--data-dir", help="data directory (default: $PEFTLAB_DATA)")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best",
                        help="the runs' checkpoint (default: best)")
    parser.add_argument("--device", help="auto, cpu or cuda[:N] (default: a run's own, else auto)")
    add_options(parser, sampling_options(), PREFERENCE_SAMPLING)
