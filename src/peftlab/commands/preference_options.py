"""The command line of `peftlab preferences` (light: options only, so `peftlab --help` starts fast) and its
sampling defaults, which its `--help` shows and `peftlab.commands.preferences` samples with."""

from __future__ import annotations

import argparse

from peftlab.options import add_options, sampling_options

# The DPO paper samples its preference data from the SFT policy as it is: temperature 1, no truncation; RT reviews
# are about 20-30 tokens, so 48 new tokens leave room for the policy's own end.
PREFERENCE_SAMPLING = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_new_tokens": 48, "seed": 0}


def preference_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True, metavar="MODEL_OR_RUN",
                        help="what samples the completions: a model name or directory (as `generate --model`), or a "
                        "causal-LM run directory (e.g. an lm SFT run), its adapter on")
    parser.add_argument("--reward", required=True, metavar="RUN_DIR",
                        help="a Rotten Tomatoes classification or instruct run: the reward is its P(positive)")
    parser.add_argument("--output", required=True, metavar="FILE", help="the pairs, one JSON line each: prompt, "
                        "chosen, rejected, chosen_score, rejected_score (written once, at the end)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--prompts", type=int, default=256, help="reviews whose first 2-8 tokens are the prompts "
                        "(default: 256)")
    parser.add_argument("--samples", type=int, default=4, help="completions sampled per prompt (default: 4)")
    parser.add_argument("--split", default="train", help="the Rotten Tomatoes split the prompts come from "
                        "(default: train)")
    parser.add_argument("--data-dir", help="data directory (default: $PEFTLAB_DATA)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts sampled together; the same seed and batch "
                        "size give the same pairs (default: 8)")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best",
                        help="the runs' checkpoint (default: best)")
    parser.add_argument("--device", help="auto, cpu or cuda[:N] (default: a run's own, else auto)")
    add_options(parser, sampling_options(), PREFERENCE_SAMPLING)
