"""One measurement in a fresh process: the parent runs a script's child mode, which prints
its figures as one `RESULT {json}` line (its own imports, peak memory and Ray, nothing of
the parent's).

    from child import result_line, run_child    # the scripts run as `python benchmarks/bench_x.py`
    print(result_line({"seconds": 1.5}))          # in the child
    r = run_child([sys.executable, __file__, "--child", ...], "the 1,000-image run")   # in the parent
"""

from __future__ import annotations

import json
import subprocess
from typing import Any, Dict, Optional, Sequence

PREFIX = "RESULT "


def result_line(result: Dict[str, Any]) -> str:
    return PREFIX + json.dumps(result)


def run_child(cmd: Sequence[str], what: str, env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Run `cmd` and return its last RESULT line's figures; on failure print its output's tail
    and exit naming `what`."""
    out = subprocess.run(list(cmd), capture_output=True, text=True, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(PREFIX)]
    if out.returncode != 0 or not lines:
        print(out.stdout[-2000:], out.stderr[-4000:])
        raise SystemExit(f"{what} failed")
    return json.loads(lines[-1][len(PREFIX):])
