"""The generation plan at ten million images: driver memory, time, plan.json, object store.

The plan is a unit table (`raybias.generation.plan`: one row per model's run of units) from
which every unit's ids, seeds and prompts are derived where needed. The baseline is the
plan as raybias stored it before (version 1: every image's id, seed and prompt in
`plan["units"]`, saved with `write_json`, and every unit's spec put into the object store
by `ray.data.from_items`): it is made here by expanding the compact plan with
`PlanUnits.expand`, which gives exactly the old units (tests/test_plan.py).

Each measurement runs in a fresh process (peak RSS: the process's peak during the work, less
what it held after its imports); new and old alternate, `--rounds` times, and the best time is kept, as
other work may share the machine:

  1. plan: build + save plan.json + load it back, and the driver's work before the first
     unit (the to-do list and its blocks for the actors), for --images images of
     --models-per-group models per group (4 groups, like colored_digits);
  2. object store: what the units put into Ray's object store before sampling starts
     (`runner.unit_dataset` vs. the old one-spec-per-unit `from_items`), read from the
     raylet's store statistics.

    python benchmarks/bench_plan.py                          # 10 M new, 1 M old
    python benchmarks/bench_plan.py --old-images 10000000     # the old form at 10 M too (~6 GB)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from child import result_line, run_child  # noqa: E402  (benchmarks/child.py)
from machine import machine  # noqa: E402  (benchmarks/machine.py)

MIB = 2 ** 20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    """Start the peak RSS afresh (Linux: imports peak higher than what they leave resident)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_plan(n_images: int, models_per_group: int, unit_size: int):
    """The clustered-DreamBooth plan of `n_images` images (a quarter per group, like
    `generate.balance: per_group`), `models_per_group` weighted cluster models per group."""
    from raybias.data.info import DatasetInfo
    from raybias.generation.plan import ModelSpec, build_plan

    info = DatasetInfo(source="colored_digits", n_classes=2, n_bias=2, class_names=["digit<5", "digit>=5"],
                       bias_names=["red", "green"],
                       class_words=[["zero", "one", "two", "three", "four"], ["five", "six", "seven", "eight", "nine"]],
                       bias_words=["red", "green"], prompt_template="a {bias} {member}", aligned=[0, 1], image_size=16,
                       severity=0.99, counts={"train": {"0": 100, "1": 1, "2": 1, "3": 100}})
    models = []
    for g in range(4):
        y, a = info.y_a(g)
        for c in range(models_per_group):
            models.append(ModelSpec(f"g{g}-c{c}", g, "dreambooth", f"a sks {info.bias_words[a]} {{member}}",
                                    list(info.class_words[y]), weight=1.0 + (c % 7), cluster=c,
                                    folder=f"generators/clustered_dreambooth/g{g}-c{c}"))
    return build_plan("clustered_dreambooth", info, models, balance="per_group", per_group=n_images // 4,
                      unit_size=unit_size, seed=0, sampling={"steps": 25, "guidance": 7.5}, base_model="sd15")


def old_form(plan):
    """The version-1 plan: the same counts and models, every unit listed with its images."""
    from raybias.generation.plan import PlanUnits

    units = PlanUnits(plan)
    old = {k: v for k, v in plan.items() if k not in ("runs", "n_units")}
    old.update(version=1, units=[units.expand(n) for n in range(len(units))])
    return old


# --------------------------------------------------------------------------- children (one measurement each)

def child_plan(args) -> dict:
    from raybias.generation.plan import PlanUnits, load_plan, save_plan
    from raybias.generation.runner import unit_blocks, units_per_task
    from raybias.rundir import RunDir

    run = RunDir(tempfile.mkdtemp(prefix="bench-plan-", dir=args.tmp))
    reset_peak()
    base = rss()
    t0 = time.perf_counter()
    plan = make_plan(args.n, args.models_per_group, args.unit_size)
    if args.child == "old":
        plan = old_form(plan)
    t1 = time.perf_counter()
    save_plan(run, plan)
    t2 = time.perf_counter()
    back = load_plan(run, plan["generator"])
    t3 = time.perf_counter()
    # the driver's work before the first unit, besides the plan: the to-do list (all units of a
    # fresh run) and what the actors are given
    if args.child == "old":
        todo = list(back["units"])  # the old driver's list of unit specs
        rows = [{"unit": int(u["unit"]), "spec": json.dumps(u)} for u in todo]
        n_blocks, n_units = len(rows), len(todo)
    else:
        units = PlanUnits(back)
        todo = list(range(len(units)))
        blocks = unit_blocks(units, todo, units_per_task(len(todo), args.actors, units.unit_size))
        n_blocks, n_units = len(blocks), len(units)
    t4 = time.perf_counter()
    size = os.path.getsize(run.path(f"synthetic/{plan['generator']}/plan.json"))
    return {"n": plan["n_images"], "units": n_units, "blocks": n_blocks, "build_s": t1 - t0, "save_s": t2 - t1,
            "load_s": t3 - t2, "todo_s": t4 - t3, "file_bytes": size, "peak_bytes": peak_rss() - base}


def store_used() -> int:
    """Bytes in this Ray's object store (the raylet's statistics; other Rays may run here)."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    state = get_state_from_address(ray.get_runtime_context().gcs_address)
    return int(get_memory_info_reply(state).store_stats.object_store_bytes_used)


def child_store(args) -> dict:
    import ray

    from raybias.generation.plan import PlanUnits
    from raybias.generation.runner import unit_dataset, units_per_task

    ray.init(num_cpus=1, object_store_memory=args.store_mb * MIB, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    plan = make_plan(args.n, args.models_per_group, args.unit_size)
    before = store_used()
    if args.child == "store-old":
        old = old_form(plan)
        rows = [{"unit": int(u["unit"]), "spec": json.dumps(u)} for u in old["units"]]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))  # the old run_units' dataset
        n_blocks = len(rows)
    else:
        units = PlanUnits(plan)
        todo = range(len(units))
        ds = unit_dataset(units, todo, units_per_task(len(todo), args.actors, units.unit_size))
        n_blocks = ds.num_blocks()
    time.sleep(1.0)  # let the raylet's statistics catch up with the puts
    used = store_used() - before
    del ds
    ray.shutdown()
    return {"n": plan["n_images"], "blocks": n_blocks, "store_bytes": used}


def measure(args, kind: str, n: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--n", str(n), "--tmp", args.tmp,
           "--models-per-group", str(args.models_per_group), "--unit-size", str(args.unit_size),
           "--actors", str(args.actors), "--store-mb", str(args.store_mb)]
    return run_child(cmd, f"{kind} at {n} images")


def best(results):
    """Per key: the smallest time over rounds (noise only adds); memory and sizes are the same each round."""
    out = dict(results[0])
    for key in ("build_s", "save_s", "load_s", "todo_s"):
        if key in out:
            out[key] = min(r[key] for r in results)
    if "peak_bytes" in out:
        out["peak_bytes"] = max(r["peak_bytes"] for r in results)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--images", type=int, default=10_000_000)
    ap.add_argument("--old-images", type=int, default=1_000_000,
                    help="images of the old (version-1) plan: at 10 M it needs ~6 GB and minutes")
    ap.add_argument("--models-per-group", type=int, default=250, help="4 groups: 250 -> a thousand models")
    ap.add_argument("--unit-size", type=int, default=512)
    ap.add_argument("--actors", type=int, default=8, help="sampler actors the blocks are cut for")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--store-mb", type=int, default=1024)
    ap.add_argument("--skip", default="", help="comma list: plan, store")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = child_store(args) if args.child.startswith("store") else child_plan(args)
        print(result_line(result), flush=True)
        return

    skip = set(filter(None, args.skip.split(",")))
    print(machine())
    print("note: other jobs may share this machine; times are the best of alternating rounds")
    print(f"plan: {args.models_per_group * 4} models (4 groups), units of {args.unit_size} images")
    with tempfile.TemporaryDirectory(prefix="bench-plan-") as tmp:
        args.tmp = tmp
        if "plan" not in skip:
            new, old = [], []
            for _ in range(args.rounds):
                new.append(measure(args, "new", args.images))
                old.append(measure(args, "old", args.old_images))
            new, old = best(new), best(old)
            print("\n1. plan: build, save plan.json, load it back; then the to-do list and the actors' blocks")
            print(f"{'':<26}{'images':>12}{'build s':>9}{'save s':>8}{'load s':>8}{'to-do s':>9}"
                  f"{'plan.json':>12}{'peak RSS':>11}")
            for name, r in (("unit table (now)", new), ("every image (before)", old)):
                print(f"{name:<26}{r['n']:>12,}{r['build_s']:>9.3f}{r['save_s']:>8.3f}{r['load_s']:>8.3f}"
                      f"{r['todo_s']:>9.3f}{r['file_bytes'] / MIB:>10.2f} M{r['peak_bytes'] / MIB:>9.1f} M")
            scale = new["n"] / old["n"]
            per_old = sum(old[k] for k in ("build_s", "save_s", "load_s", "todo_s"))
            per_new = sum(new[k] for k in ("build_s", "save_s", "load_s", "todo_s"))
            print(f"before, scaled to {new['n']:,} images (linear in the images): "
                  f"{per_old * scale:.1f} s, {old['peak_bytes'] * scale / MIB:,.0f} MiB peak, "
                  f"{old['file_bytes'] * scale / MIB:,.0f} MiB plan.json")
            print(f"ratio before/now at {new['n']:,} images: time {per_old * scale / per_new:,.0f}x, "
                  f"peak memory {old['peak_bytes'] * scale / max(new['peak_bytes'], 1):,.0f}x; "
                  f"{new['units']:,} units in {new['blocks']:,} blocks")
            met = new["peak_bytes"] < 200 * MIB and new["build_s"] < 5
            print(f"goal (a 10 M-image plan in < 200 MB of driver memory and < 5 s), at {new['n']:,} images: "
                  f"{new['peak_bytes'] / MIB:.1f} MiB, {new['build_s']:.3f} s -> {'met' if met else 'NOT met'}")
        if "store" not in skip:
            print("\n2. object store: the units' blocks before sampling starts")
            rows = [measure(args, "store-new", n) for n in (args.old_images, args.images)]
            rows.append(measure(args, "store-old", args.old_images))
            print(f"{'':<34}{'images':>12}{'blocks':>9}{'store':>12}{'per image':>11}")
            for name, r in zip(("unit numbers (now)", "unit numbers (now)", "one spec per unit (before)"), rows):
                print(f"{name:<34}{r['n']:>12,}{r['blocks']:>9,}{r['store_bytes'] / MIB:>10.2f} M"
                      f"{r['store_bytes'] / r['n']:>9.3f} B")


if __name__ == "__main__":
    main()
