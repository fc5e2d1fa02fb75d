"""CI: the quickstart's report lists every method of its config, each with a result.

usage: python .ci/check_report.py CONFIG REPORT_MD
"""

import re
import sys

from raybias.config import load_config


def main(config: str, report: str) -> int:
    methods = list(load_config(config).methods)
    try:
        text = open(report, encoding="utf-8").read()
    except OSError as exc:
        print(f"CI: cannot read the report {report}: {exc}", file=sys.stderr)
        return 1
    # a results-table row: "| method | 12.3 | ..." (a number after the name)
    missing = [m for m in methods if not re.search(rf"^\|\s*{re.escape(m)}\s*\|\s*[\d.]+", text, re.M)]
    if missing:
        print(f"CI: {report} has no result row for {', '.join(missing)}", file=sys.stderr)
        return 1
    print(f"CI: {report} lists all {len(methods)} methods: {', '.join(methods)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
