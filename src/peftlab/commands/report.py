"""`peftlab report`: the comparison table and plots of runs, or one HTML page."""

from __future__ import annotations

import argparse

from peftlab.errors import PeftlabError
from peftlab.report import print_report, write_methods_report, write_report
from peftlab.report.html import write_html_report


def run_report(args: argparse.Namespace) -> None:
    if args.html:
        if args.by_method:
            raise PeftlabError("--html takes runs and folders as they are; drop --by-method (or --html)")
        print(f"page: {write_html_report(args.run_dirs, args.html)}")
        return
    write = write_methods_report if args.by_method else write_report
    print_report(*write(args.run_dirs, args.output_dir))
