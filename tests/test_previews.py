"""Fine-tuning previews cost O(models shown), whatever the number of models (issue: a
thousand per-cluster models made samples.png take longer than the whole stage)."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from raybias.rundir import RunDir
from raybias.layout import generator_samples, preview_png, previews_json
from raybias.finetune.runner import MAX_PREVIEW_MODELS, preview_sample, write_samples_png


def test_preview_sample_is_an_even_deterministic_sample():
    names = [f"m{i}" for i in range(1000)]
    shown = preview_sample(names)
    assert len(shown) == MAX_PREVIEW_MODELS and shown[0] == "m0" and len(set(shown)) == len(shown)
    assert shown == sorted(shown, key=names.index)  # in the models' order
    gaps = np.diff([names.index(n) for n in shown])
    assert gaps.min() >= 31 and gaps.max() <= 32  # evenly spread over all of them
    assert preview_sample(names[:5]) == names[:5]


def test_a_thousand_models_give_one_sheet_of_the_sample(tmp_path):
    run = RunDir(tmp_path / "run")
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 48, 3), 200, np.uint8)).save(buf, format="PNG")
    names = [f"g{i}-c0" for i in range(1000)]
    for n in names:
        run.write_text(previews_json("lora", n), json.dumps(["base", "tuned"]))
        for k in range(2):
            run.write_bytes(preview_png("lora", n, k), buf.getvalue())
    write_samples_png(run, "lora", names)
    sheet = Image.open(run.path(generator_samples("lora")))
    assert sheet.height < 100 * 2 * MAX_PREVIEW_MODELS  # one figure for the sample, not 2,000 rows
