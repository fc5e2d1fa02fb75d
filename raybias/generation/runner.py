"""The driver side of generation: units through a Ray Data actor pool, progress, sample grid.

The dataset holds one row per unfinished work unit, one block each, so units stream to the
actors independently; the actors write the shards, and only a small summary row per unit
comes back to the driver, which marks the unit finished in the manifest and feeds the
progress bar (images/s). Memory on the driver stays flat however many images are made.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from raybias.rundir import RunDir, StageFailed


def unit_key(unit: int) -> str:
    return f"unit-{unit:05d}"


def sampling_settings(gen_cfg) -> Dict[str, Any]:
    """The `generate.*` values the sampler actor needs (also saved in the plan)."""
    return {
        "scheduler": gen_cfg.scheduler,
        "steps": int(gen_cfg.steps),
        "guidance": float(gen_cfg.guidance),
        "batch_size": int(gen_cfg.batch_size),
        "size": gen_cfg.size,
        "attention": gen_cfg.attention,
        "dtype": gen_cfg.dtype,
        "channels_last": bool(gen_cfg.channels_last),
        "compile": bool(gen_cfg.compile),
        "num_gpus": float(gen_cfg.num_gpus),
        "num_threads": max(1, int(gen_cfg.num_cpus)),
        "model_cache": int(gen_cfg.model_cache),
        "image_format": str(gen_cfg.image_format),
        "image_quality": int(gen_cfg.image_quality),
    }


def run_units(run: RunDir, plan: Dict[str, Any], units: Sequence[Dict[str, Any]], *, base_model: str,
              base_revision: Optional[str], concurrency: int, num_gpus: float, num_cpus: float,
              on_unit: Optional[Callable[[Dict[str, Any]], None]] = None, progress: bool = True,
              desc: Optional[str] = None, allow_pickle: bool = False,
              model_cache_gb: Optional[float] = None) -> Dict[str, Any]:
    """Sample and write `units` through an actor pool; returns runtime facts (attention, device…)."""
    import ray

    from raybias.console import bar as progress_bar

    from raybias.generation.sampler import SamplerActor

    generator = plan["generator"]
    if not units:
        return {"units": 0, "images": 0, "seconds": 0.0}
    rows = [{"unit": int(u["unit"]), "spec": json.dumps(u)} for u in units]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map_batches(
        SamplerActor,
        fn_constructor_kwargs=dict(run_spec=run.spec(), generator=generator, base_model=base_model,
                                   base_revision=base_revision, models=plan["models"],
                                   # base.allow_pickle and the disk cache's cap ride along, outside
                                   # the saved plan (they do not change what is made)
                                   sampling=dict(plan["sampling"], allow_pickle=bool(allow_pickle),
                                                 **({} if model_cache_gb is None
                                                    else {"model_cache_gb": float(model_cache_gb)}))),
        # two calls per actor at once, on two threads: one unit encodes and writes its shard
        # while the next samples (SamplerActor.make_unit holds a lock around sampling only)
        compute=ray.data.ActorPoolStrategy(size=max(1, min(int(concurrency), len(rows))),
                                           max_concurrent_calls_per_actor=2, enable_true_multi_threading=True),
        num_gpus=num_gpus or None, num_cpus=num_cpus, batch_size=1, batch_format="numpy",
        zero_copy_batch=True)
    total = sum(len(u["ids"]) for u in units)
    facts: Dict[str, Any] = {"units": 0, "images": 0, "sample_seconds": 0.0}
    started = time.perf_counter()
    with progress_bar(total=total, unit="img", desc=desc or f"generate {generator}", disable=not progress,
                      smoothing=0.1) as bar:
        try:
            for row in ds.iter_rows():
                facts["units"] += 1
                facts["images"] += int(row["n_images"])
                facts["sample_seconds"] += float(row["seconds"])
                for key in ("attention", "device", "dtype"):
                    facts[key] = row[key]
                if on_unit is not None:
                    on_unit(row)
                bar.update(int(row["n_images"]))
                bar.set_postfix(units=f"{facts['units']}/{len(rows)}", refresh=False)
        except StageFailed:
            raise
        except Exception as exc:  # a worker error arrives wrapped; keep its own first line
            raise StageFailed(f"generation of {generator!r} failed after {facts['units']} of {len(rows)} "
                              f"work units (rerun with --resume to continue): {_first_line(exc)}") from exc
    facts["seconds"] = time.perf_counter() - started
    facts["images_per_s"] = facts["images"] / facts["seconds"] if facts["seconds"] > 0 else 0.0
    return facts


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    # Ray wraps the worker's traceback; the real error is its last non-empty line before the
    # first "The above exception was the direct cause" (after it come Ray Data's wrapper and
    # its advice on retries), or the last line when there is no such chain.
    head = text.split("The above exception was the direct cause", 1)[0]
    lines = [ln for ln in head.splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    return lines[-1] if len(lines) > 1 else lines[0]


def sample_grid(run: RunDir, plan: Dict[str, Any], info, rel: str, per_row: int = 8) -> Optional[str]:
    """PNG grid: one row per (group, cluster) model, its first images; titled by group and prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow.parquet as pq

    from raybias.data.images import decode
    from raybias.layout import shard_path

    units_of: Dict[str, List[Dict[str, Any]]] = {}
    for u in plan["units"]:
        units_of.setdefault(u["model"], []).append(u)
    if not units_of:
        return None
    rows = sorted((us[0] for us in units_of.values()),
                  key=lambda u: (u["group"], -1 if u["cluster"] is None else u["cluster"]))
    fig, axes = plt.subplots(len(rows), per_row, figsize=(per_row * 1.1, len(rows) * 1.25 + 0.4), squeeze=False)
    for r, unit in enumerate(rows):
        images: List[bytes] = []
        prompts: List[str] = []
        for u in units_of[unit["model"]]:  # a model's first units, until the row is full
            if len(images) >= per_row:
                break
            table = pq.read_table(run.path(shard_path(plan["generator"], u["unit"])),
                                  columns=["image", "prompt"], filesystem=run.fs).slice(0, per_row - len(images))
            images += table.column("image").to_pylist()
            prompts += table.column("prompt").to_pylist()
        for c in range(per_row):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if c < len(images):
                ax.imshow(decode(images[c]), interpolation="nearest")
        label = f"g{unit['group']} {info.group_name(unit['group'])}"
        if unit["cluster"] is not None:
            label += f" c{unit['cluster']}"
        prompt = prompts[0] if prompts else ""
        if unit.get("negative_prompt"):
            prompt += f"  (not: {unit['negative_prompt']})"
        axes[r][0].set_title(f"{label}: {prompt}", loc="left", fontsize=7)
    fig.suptitle(f"{plan['generator']}: samples per group" + (" and cluster" if any(
        u["cluster"] is not None for u in rows) else ""), fontsize=9)
    fig.tight_layout()
    run.write_figure(rel, fig)
    plt.close(fig)
    return run.path(rel)


def missing_units(run: RunDir, generator: str, plan: Dict[str, Any]) -> List[int]:
    """Planned units whose shard is NOT under its final name (cheap: a listing)."""
    from raybias.data.synthetic import finished_units

    have = set(finished_units(run, generator))
    return [u["unit"] for u in plan["units"] if u["unit"] not in have]
