"""`peftlab predict RUN_DIR`: a trained run on inputs of one's own (`peftlab.predict`), one JSON line per input on
standard output or in --output; everything else (loading notes, the progress bar, the closing line) goes to
standard error, so the output can be piped."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from peftlab.errors import PeftlabError
from peftlab.fileio import check_writable, finite_or_null, write_text_atomic
from peftlab.predict import load_run, read_inputs
from peftlab.settings import expand_escapes


def run_predict(args: argparse.Namespace) -> None:
    texts = [expand_escapes(text) for text in args.text]
    if not texts and not args.input:
        raise PeftlabError("no input given: pass --text TEXT (repeatable) or --input FILE")
    inputs, origins = list(texts), [f"--text {number}" for number in range(1, len(texts) + 1)]
    if args.input:
        file_inputs, file_origins = read_inputs(args.input)
        inputs, origins = inputs + file_inputs, origins + file_origins
    if args.output:
        check_output(Path(args.output), args.overwrite)  # before the model loads
    with contextlib.redirect_stdout(sys.stderr):  # the workloads' notes while loading are not records
        run = load_run(args.run_dir, args.checkpoint, args.device, args.weights)
        records = run.predict(inputs, args.batch_size, progress=True, origins=origins)
    lines = "".join(json.dumps(finite_or_null(record), ensure_ascii=False) + "\n" for record in records)
    if args.output:
        write_text_atomic(Path(args.output), lines)
        print(f"{len(records)} prediction(s) of {args.run_dir} [{args.checkpoint}]: {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(lines)


def check_output(path: Path, overwrite: bool) -> None:
    """--output names a file to create, or with --overwrite one to replace; it can be written."""
    if path.exists() and not overwrite:
        raise PeftlabError(f"{path} exists; nothing was written. Fix: choose another --output, or add --overwrite to "
                           "replace it")
    check_writable(path)
