"""Faults for the test suite to inject: inert unless a test arms one.

The suite proves that a killed fine-tuning worker or a failed classifier worker is resumed
exactly; for that a worker must die at a chosen step. Those hooks live here, in one place,
instead of inside the stages: production code asks `planned(point, names)` on the driver
(None unless armed) and passes what it gets to its workers, which call `strike(fault, at)`
at each step (a no-op for None).

A test arms a fault with `arm(monkeypatch, point, target, at)`, which sets `RAYBIAS_FAULTS`
in the driver's environment (JSON: {point: {"target": ..., "at": ...}}). Only the driver
reads it, so a Ray already running with another environment does not matter.

Points:
- `finetune.step`: SIGKILL the fine-tuning worker of job `target` ("gen/job" or "job") once,
  after step `at`; a marker file (given by the driver) keeps a restarted worker alive.
- `train.epoch`: the first worker session of classifier `target` ("method/seed") raises after
  `at` epochs; a session restored from a checkpoint trains on.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any, Dict, Optional, Sequence

ENV = "RAYBIAS_FAULTS"
POINTS = ("finetune.step", "train.epoch")


def arm(monkeypatch, point: str, target: str, at: int, **extra: Any) -> None:
    """Arm one fault for the rest of a test (pytest's monkeypatch undoes it)."""
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r} (known: {', '.join(POINTS)})")
    armed = json.loads(os.environ.get(ENV) or "{}")
    armed[point] = {"target": target, "at": int(at), **extra}
    monkeypatch.setenv(ENV, json.dumps(armed))


def planned(point: str, names: Sequence[str], **extra: Any) -> Optional[Dict[str, Any]]:
    """The fault armed at `point` for a target called any of `names`, as the dict to hand to
    the worker (with `extra`, e.g. its marker file); None when none is (always, outside tests)."""
    text = os.environ.get(ENV)
    if not text:
        return None
    fault = json.loads(text).get(point)
    if not fault or fault.get("target") not in names:
        return None
    return {**fault, "point": point, **extra}


def strike(fault: Optional[Dict[str, Any]], at: int, *, first_session: bool = True) -> None:
    """Worker side: act if `fault` is due at step/epoch `at`."""
    if not fault or int(at) < int(fault["at"]):
        return
    if fault["point"] == "finetune.step":
        marker = fault["marker"]
        if int(at) != int(fault["at"]) or os.path.exists(marker):
            return
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        with open(marker, "w") as f:
            f.write(str(at))
        # Give the controller time to register the checkpoint reported before this step.
        time.sleep(float(fault.get("delay_s", 5.0)))
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault["point"] == "train.epoch" and first_session:
        # The controller polls workers; give it time to register the checkpoint just
        # reported, or a loaded machine restarts the group without it and fails again.
        time.sleep(3)
        raise RuntimeError(f"injected failure after {at} epoch(s) (fault {fault['point']})")
