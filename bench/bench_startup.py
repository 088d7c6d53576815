"""Start-up time of the commands that do no work (`peftlab --help`, `--version`, `models`, `recipes`, `templates`,
every `COMMAND --help`): today's source against another checkout's (e.g. the commit before the lazy command line),
run alternately in fresh processes so both see the same machine load.

    .venv/bin/python bench/bench_startup.py --baseline /tmp/baseline/src --repeats 5

`--baseline` is a `src` folder of another checkout (`git worktree add /tmp/baseline <commit>`); without it only
today's times are measured. Prints the median and the range (min-max) of the wall-clock seconds per command and
writes bench/results/startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "src"
SUBCOMMANDS = ("generate", "train", "eval", "export", "sweep", "report", "recipes", "models", "prepare", "templates",
               "distill", "transfer-set")
COMMANDS = [["--help"], ["--version"], ["models"], ["recipes"], ["templates"]] + [[name, "--help"] for name in SUBCOMMANDS]


def seconds(source: Path, arguments: list[str]) -> float:
    """Wall-clock seconds of `python -m peftlab ARGUMENTS` with `source` first on the path."""
    environment = dict(os.environ, PYTHONPATH=str(source))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "peftlab", *arguments], env=environment, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def imports_torch(source: Path) -> bool:
    code = ("import sys\nfrom peftlab.cli import _build_parser\n_build_parser()\n"
            "print('torch' in sys.modules or 'transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(source)),
                            capture_output=True, text=True, check=True)
    return result.stdout.strip() == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="a `src` folder of another checkout to compare with")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sources = {"today": SOURCE} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    times = {name: {" ".join(command): [] for command in COMMANDS} for name in sources}
    for _ in range(args.repeats):
        for command in COMMANDS:
            for name, source in sources.items():  # alternately, so both see the same load
                times[name][" ".join(command)].append(seconds(source, command))
    header = f"{'command':<24}" + "".join(f"{name + ' median (range) s':>32}" for name in sources)
    print(header)
    for command in times["today"]:
        cells = []
        for name in sources:
            values = times[name][command]
            cells.append(f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})")
        print(f"{command:<24}" + "".join(f"{cell:>32}" for cell in cells))
    for name, source in sources.items():
        print(f"{name}: the command line imports torch or transformers: {imports_torch(source)}")
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "startup.json").write_text(json.dumps({"repeats": args.repeats, "seconds": times}, indent=1))


if __name__ == "__main__":
    main()
