"""The driver side of generation: units through a Ray Data actor pool, progress, sample grid.

The dataset holds one row per unfinished work unit, holding only its number (each actor
derives ids, seeds and prompts from the plan's unit table), in blocks of consecutive units
of one model: Ray Data gives a block to one actor, so a model is loaded by few actors
instead of by whichever actor is free for each of its units. The actors write the shards;
a small summary row per unit comes back to the driver for the progress bar (images/s).
The driver and the object store hold a few bytes per unit, nothing per image.
"""

from __future__ import annotations

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


# A task (a block of units given to one actor) holds at most this many images, so a lost
# actor's retried task redoes little; and each actor gets at least TASKS_PER_ACTOR tasks, so
# the pool's tail (the last tasks, one actor each) stays short.
TASK_IMAGES = 4096
TASKS_PER_ACTOR = 4


def units_per_task(n_units: int, actors: int, unit_size: int) -> int:
    """How many consecutive units of one model an actor is dealt at once."""
    return max(1, min(n_units // (TASKS_PER_ACTOR * max(1, actors)), TASK_IMAGES // max(1, unit_size)))


def unit_blocks(units, todo: Sequence[int], per_task: int) -> List[List[int]]:
    """`todo` (unit numbers, in plan order) cut into blocks of at most `per_task` consecutive
    units of one model: an actor that takes a block switches models at most once for it."""
    blocks: List[List[int]] = []
    last_model = None
    for n in todo:
        model = units.model_of(n)
        if not blocks or model != last_model or len(blocks[-1]) >= per_task:
            blocks.append([])
        blocks[-1].append(int(n))
        last_model = model
    return blocks


def unit_dataset(units, todo: Sequence[int], per_task: int):
    """A Ray dataset of unit numbers, one block per `unit_blocks` block.

    Rows carry only a unit number: each actor derives the unit's ids, seeds and prompts
    from the plan it was built with, so the object store holds a few bytes per unit, not
    per image. Ray Data hands a whole block to one actor; the dataset's tiny target block
    size makes every unit's result row its own output block, so it reaches the driver
    (progress, facts) when that unit is done rather than when the block is."""
    import pyarrow as pa
    import ray
    from ray.data import DataContext

    tables = [pa.table({"unit": pa.array(b, pa.int64())}) for b in unit_blocks(units, todo, per_task)]
    ctx = DataContext.get_current()
    before = ctx.target_max_block_size
    ctx.target_max_block_size = 1
    try:  # a dataset keeps (a copy of) the context it was made under, and so do those built on it
        return ray.data.from_arrow(tables)
    finally:
        ctx.target_max_block_size = before


def run_units(run: RunDir, plan: Dict[str, Any], todo: Sequence[int], *, base_model: str,
              base_revision: Optional[str], concurrency: int, num_gpus: float, num_cpus: float,
              on_unit: Optional[Callable[[Dict[str, Any]], None]] = None, progress: bool = True,
              desc: Optional[str] = None, allow_pickle: bool = False,
              per_task: Optional[int] = None, model_cache_gb: Optional[float] = None) -> Dict[str, Any]:
    """Sample and write the units numbered `todo` through an actor pool; returns runtime facts
    (attention, device…). `per_task`: units dealt to an actor at once (default `units_per_task`)."""
    import ray

    from raybias.console import bar as progress_bar
    from raybias.generation.plan import PlanUnits

    from raybias.generation.sampler import CALLS_PER_ACTOR, SamplerActor

    generator = plan["generator"]
    if not len(todo):
        return {"units": 0, "images": 0, "seconds": 0.0}
    units = PlanUnits(plan)
    actors = max(1, min(int(concurrency), len(todo)))
    per_task = int(per_task or units_per_task(len(todo), actors, units.unit_size))
    # what the actors derive units from: the unit table and the models, never a list per image
    compact = {k: plan[k] for k in ("generator", "seed", "unit_size", "models", "runs", "n_units")}
    ds = unit_dataset(units, todo, per_task).map_batches(
        SamplerActor,
        fn_constructor_kwargs=dict(run_spec=run.spec(), generator=generator, base_model=base_model,
                                   base_revision=base_revision, plan=compact,
                                   # base.allow_pickle and the disk cache's cap ride along, outside
                                   # the saved plan (they do not change what is made)
                                   sampling=dict(plan["sampling"], allow_pickle=bool(allow_pickle),
                                                 **({} if model_cache_gb is None
                                                    else {"model_cache_gb": float(model_cache_gb)}))),
        # two calls per actor at once, on two threads: one unit encodes and writes its shard
        # while the next samples (SamplerActor.make_unit holds a lock around sampling only)
        compute=ray.data.ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=CALLS_PER_ACTOR,
                                           enable_true_multi_threading=True),
        num_gpus=num_gpus or None, num_cpus=num_cpus, batch_size=1, batch_format="numpy",
        zero_copy_batch=True)
    total = sum(units.count(n) for n in todo)
    facts: Dict[str, Any] = {"units": 0, "images": 0, "sample_seconds": 0.0, "units_per_task": per_task}
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
                bar.set_postfix(units=f"{facts['units']}/{len(todo)}", refresh=False)
        except StageFailed:
            raise
        except Exception as exc:  # a worker error arrives wrapped; keep its own first line
            raise StageFailed(f"generation of {generator!r} failed after {facts['units']} of {len(todo)} "
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

    runs_of: Dict[str, List[Dict[str, Any]]] = {}
    for r in plan["runs"]:
        runs_of.setdefault(r["model"], []).append(r)
    if not runs_of:
        return None
    rows = sorted((rs[0] for rs in runs_of.values()),
                  key=lambda r: (r["group"], -1 if r["cluster"] is None else r["cluster"]))
    fig, axes = plt.subplots(len(rows), per_row, figsize=(per_row * 1.1, len(rows) * 1.25 + 0.4), squeeze=False)
    for i, first in enumerate(rows):
        images: List[bytes] = []
        prompts: List[str] = []
        # a model's first units, until the row is full
        numbers = (n for r in runs_of[first["model"]] for n in range(r["first_unit"], r["first_unit"] + r["n_units"]))
        for n in numbers:
            if len(images) >= per_row:
                break
            table = pq.read_table(run.path(shard_path(plan["generator"], n)),
                                  columns=["image", "prompt"], filesystem=run.fs).slice(0, per_row - len(images))
            images += table.column("image").to_pylist()
            prompts += table.column("prompt").to_pylist()
        for c in range(per_row):
            ax = axes[i][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if c < len(images):
                ax.imshow(decode(images[c]), interpolation="nearest")
        label = f"g{first['group']} {info.group_name(first['group'])}"
        if first["cluster"] is not None:
            label += f" c{first['cluster']}"
        prompt = prompts[0] if prompts else ""
        if first.get("negative_prompt"):
            prompt += f"  (not: {first['negative_prompt']})"
        axes[i][0].set_title(f"{label}: {prompt}", loc="left", fontsize=7)
    fig.suptitle(f"{plan['generator']}: samples per group" + (" and cluster" if any(
        r["cluster"] is not None for r in rows) else ""), fontsize=9)
    fig.tight_layout()
    run.write_figure(rel, fig)
    plt.close(fig)
    return run.path(rel)


def missing_units(run: RunDir, generator: str, plan: Dict[str, Any]) -> List[int]:
    """Planned units whose shard is NOT under its final name (cheap: a listing)."""
    from raybias.data.synthetic import finished_units

    have = set(finished_units(run, generator))
    return [n for n in range(int(plan["n_units"])) if n not in have]
