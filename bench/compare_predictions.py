"""How many predictions two `--predictions` files of the same evaluation share (e.g. `peftlab eval RUN --weights
int8 --predictions int8.jsonl` against `--weights fp32`), line by line, each line's origin checked.

    python bench/compare_predictions.py fp32.jsonl int8.jsonl
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    files = [[json.loads(line) for line in open(path, encoding="utf-8")] for path in sys.argv[1:]]
    first, second = files
    if [record["origin"] for record in first] != [record["origin"] for record in second]:
        raise SystemExit("the two files hold other examples (or another order): not the same evaluation")
    same = sum(a["prediction"] == b["prediction"] for a, b in zip(first, second))
    print(f"{same} of {len(first)} predictions the same")


if __name__ == "__main__":
    main()
