"""benchmarks/device: the one-command GPU benchmark runs end to end on the CPU (tiny arch, quick),
without Ray (the device machine has none), and writes the rows, the smoke and the table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEVICE = ROOT / "benchmarks" / "device"

# Runs the script as __main__ with `import ray` refused, as on the device machine.
NO_RAY = """
import runpy, sys
class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("ray is not installed on the device machine (blocked by the test)")
sys.meta_path.insert(0, NoRay())
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""

OK_ROWS = [
    "matmul", "smoke",
    "sample-raybias/fp32/sdpa/eager/nchw/b1", "sample-raybias/fp32/sdpa/eager/nchw/b2",
    "sample-raybias/bf16/sdpa/eager/nchw/b2", "sample-raybias/fp32/sdpa/eager/cl/b2",
    "sample-stock/fp32/sdpa/b1", "sample-stock/fp32/sdpa/b2", "sample-stock/bf16/sdpa/b1",
    "train-lora/fp32/b2", "train-dreambooth/fp32/b2",
]
SKIPPED_ROWS = [
    "sample-raybias/fp32/xformers/eager/nchw/b2", "sample-stock/fp32/xformers/b1",
    "sample-raybias/fp32/sdpa/compile/nchw/b2", "sample-raybias/fp32/sdpa/compile/cl/b2",
]


def test_device_scripts_parse():
    for name in ("run.sh", "fetch_wheels.sh"):
        subprocess.run(["bash", "-n", str(DEVICE / name)], check=True)


def test_wheels_are_ignored_not_committed():
    text = (DEVICE / ".gitignore").read_text()
    assert "wheels/" in text


def test_bench_device_cpu_tiny(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    cmd = [sys.executable, "-c", NO_RAY, str(DEVICE / "bench_device.py"), "--device", "cpu", "--arch", "tiny",
           "--budget-s", "60", "--quick", "--threads", "1", "--peak-tflops", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    doc = json.loads((out / "results.json").read_text())
    rows = {r["id"]: r for r in doc["rows"]}
    assert doc["meta"]["finished"] is True
    assert doc["meta"]["peak_tflops"] == 1.0
    for rid in OK_ROWS:
        assert rid in rows, f"missing row {rid}: {sorted(rows)}"
        assert rows[rid]["status"] == "ok", rows[rid]
    for rid in OK_ROWS[:1] + OK_ROWS[2:]:  # every measured rate, FLOP rate and MFU is a positive number
        r = rows[rid]
        assert r["rate"] > 0 and r["achieved_tflops"] > 0 and r["mfu"] > 0, r
        assert r["reps"] >= 1 and r["median_s"] > 0, r
    assert rows["train-dreambooth/fp32/b2"]["images_per_step"] == 4  # prior preservation doubles the batch
    assert rows["train-lora/fp32/b2"]["loss_finite"] and rows["train-dreambooth/fp32/b2"]["loss_finite"]
    for rid in SKIPPED_ROWS:  # no xformers and no torch.compile on the CPU: said, not silently left out
        assert rows[rid]["status"] == "skipped" and rows[rid]["note"], rows[rid]

    smoke = doc["smoke"]
    assert smoke["passed"] is True, smoke
    for key in ("raybias_fp32_unet_finite", "raybias_bf16_vae_finite", "stock_images_finite",
                "raybias_fp32_images_not_constant", "lora_changes_output", "lora_saved_safetensors",
                "lora_loads_back", "lora_loaded_changes_output"):
        assert smoke["checks"][key] is True, key
    assert doc["flop"]["sample_tflop_per_image"] > 0 and doc["flop"]["unet_gflop_per_image"] > 0

    md = (out / "results.md").read_text()
    assert "| # | what | dtype |" in md
    assert md.count("\n| ") >= len(doc["rows"]) + 1  # the header and one line per row
    assert "smoke: passed" in md
