"""`peftlab report`: the comparison table and plots of runs, or one HTML page."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from peftlab.errors import PeftlabError
from peftlab.report import print_report, write_methods_report, write_report
from peftlab.report.html import write_html_report

REPORTS_FOLDER = "reports"


def default_output_dir() -> Path:
    """reports/<date>-<time>/: a report of its own each time, never into the working directory itself."""
    return Path(REPORTS_FOLDER) / time.strftime("%Y%m%d-%H%M%S")


def run_report(args: argparse.Namespace) -> None:
    if args.html:
        if args.by_method:
            raise PeftlabError("--html takes runs and folders as they are; drop --by-method (or --html)")
        if args.output_dir:
            raise PeftlabError("--html OUT.html names the page itself; drop --output-dir (or --html)")
        print(f"page: {write_html_report(args.run_dirs, args.html)}")
        return
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir()
    write = write_methods_report if args.by_method else write_report
    print_report(*write(args.run_dirs, output_dir))
    print(f"report folder: {output_dir}")
