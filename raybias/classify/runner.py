"""Driver side: one Ray Train `TorchTrainer` per (method, seed), several at once.

`train_classifier` trains one classifier and writes `classifiers/<method>/<seed>/`
(metrics.json, model.safetensors, curves.png, method artifacts), recorded in the manifest
as `train/<method>/<seed>`. Ray Train keeps its checkpoints under that folder
(`train-<method>-<seed>/`), one per epoch, so a failed or killed run resumes at the next
epoch: automatically within a run (`train.max_failures`), and across invocations with
`--resume` (same storage path and name, the same config). The folder is removed once the
outputs are written.

`train_methods` runs all (method, seed) pairs, up to as many trainers at once as the
cluster's CPUs (or GPUs) fit, each in a driver thread blocked on its `fit()`.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf

from raybias import faults
from raybias.classify.data import DataSet, real_sets, stream_dataset
from raybias.classify.loop import TrainJob, train_loop_per_worker
from raybias.classify.recipes import get_method
from raybias.classify.models import check_pretrained
from raybias.config import config_hash
from raybias.data.info import DatasetInfo
from raybias.layout import (DDB, DDB_AMPLIFIER_KEY, DDB_GENERATE_KEY, PREPARE_KEY, classifier_dir, curves_png,
                            filter_key, metrics_path, train_key, trainer_name)
from raybias.methods import generator_of, method_config, train_method_of, train_sections
from raybias.rundir import RunDir, StageFailed

log = logging.getLogger("raybias.train")


def _root_cause(exc: BaseException) -> str:
    """The innermost error message of a Ray Train failure (worker tracebacks are nested)."""
    seen = exc
    for attr in ("worker_failures",):
        failures = getattr(exc, attr, None)
        if failures:
            seen = next(iter(failures.values()))
    cause = seen
    while getattr(cause, "__cause__", None) is not None:
        cause = cause.__cause__
    text = str(cause).strip().splitlines()
    # Ray prints the remote traceback; its last line is the original "Type: message"
    last = [line for line in text if line.strip()][-1:] or [repr(cause)]
    return last[0]


def build_job(cfg, run: RunDir, method: str, seed: int, info: DatasetInfo,
              real: Optional[Dict[str, DataSet]] = None) -> TrainJob:
    """The worker's job for (method, seed): config, data-set metadata, method state."""
    mcfg = method_config(cfg, method)
    t = mcfg.train
    sets = dict(real if real is not None else real_sets(run))
    hook = get_method(t.method)
    method_state = hook.prepare(mcfg, run, sets, int(seed))
    for name, ds in sets.items():
        if len(ds) == 0 and name in ("train", "val", "test", "stage1"):
            raise StageFailed(f"training {method} (seed {seed}): the {name!r} data set is empty "
                              f"({', '.join(ds.files[:2]) or 'no files'})")
    group_names = [info.group_name(g) for g in range(info.n_groups)]
    return TrainJob(
        # run.spec() is absolute (RunDir makes it so): Ray Train workers run in their own directory
        run_spec=run.spec(), method=method, train_method=t.method, seed=int(seed),
        train=OmegaConf.to_container(t, resolve=True), n_classes=info.n_classes, n_groups=info.n_groups,
        group_names=group_names, image_size=int(info.image_size), sets=sets, method_state=method_state,
        torch_threads=max(1, int(t.cpus_per_worker)),
        config_hash=config_hash(mcfg, train_sections(method)),
    )


def cached_if_small(data, n_rows: int, image_size: int, cache_mb: int):
    """The decoded stream `data`, materialised once in the object store when it is small.

    Per epoch, reading Parquet and decoding PNGs in Ray Data costs more than a small model's
    step (bench_train_data.py); decoded 16-px images are 768 bytes each. A set is cached when
    its decoded size is within `cache_mb` and half the object store. It is materialised with
    preserve_order (blocks in stream order), but its batches need not fall as the per-epoch
    path's do, which is why train.stream_cache_mb is not an execution-only key.
    """
    import ray

    decoded_mb = n_rows * 3 * image_size * image_size / 2**20
    store_mb = ray.cluster_resources().get("object_store_memory", 0) / 2**20
    if cache_mb <= 0 or decoded_mb > cache_mb or decoded_mb > store_mb / 2:
        return data
    ctx = ray.data.DataContext.get_current()
    keep = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        return data.materialize()
    finally:
        ctx.execution_options.preserve_order = keep


def _trainer(job: TrainJob, run: RunDir, t, fault: Optional[Dict[str, Any]], callbacks=None):
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Starting a worker group imports torch in fresh processes: on a busy machine that can
    # outlast Ray Train's 60 s default and fail a run that would have trained fine.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    resources = {"CPU": float(t.cpus_per_worker)}
    if t.use_gpu:
        resources["GPU"] = 1.0
    datasets = None
    dataset_config = None
    if not t.in_memory:
        from ray.data import ExecutionOptions

        from raybias.classify.loop import TRAIN_SETS

        # Training sets stream through Ray Data, split among workers, in a fixed order
        # (reproducible); workers read evaluation sets from the Parquet files themselves.
        datasets = {name: cached_if_small(stream_dataset(run, ds, job.image_size), len(ds), job.image_size,
                                          int(t.stream_cache_mb))
                    for name, ds in job.sets.items() if name in TRAIN_SETS}
        dataset_config = DataConfig(datasets_to_split="all",
                                    execution_options=ExecutionOptions(preserve_order=True))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job, "fault": fault},
        scaling_config=ScalingConfig(num_workers=int(t.num_workers), use_gpu=bool(t.use_gpu),
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=trainer_name(job.method, job.seed),
            storage_path=run.path(classifier_dir(job.method, job.seed)),
            storage_filesystem=run.fs,
            failure_config=FailureConfig(max_failures=int(t.max_failures)),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),  # no line per reported epoch
            callbacks=list(callbacks or []),  # e.g. Tune's TuneReportCallback in a sweep trial
        ),
        datasets=datasets,
        dataset_config=dataset_config,
    )


def _curves_png(history: List[Dict[str, Any]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    x = list(range(1, len(history) + 1))
    ax1.plot(x, [h["val_wga"] for h in history], label="val WGA")
    ax1.plot(x, [h["val_aga"] for h in history], label="val AGA")
    ax1.set_ylim(0, 1)
    ax2.plot(x, [h["train_loss"] for h in history], label="train loss")
    ax2.plot(x, [h["val_loss"] for h in history], label="val loss")
    start = 0
    for i, h in enumerate(history):  # phase boundaries
        if i and h["phase"] != history[i - 1]["phase"]:
            for ax in (ax1, ax2):
                ax.axvline(i + 0.5, color="grey", lw=0.8, ls="--")
            start = i
    for ax in (ax1, ax2):
        ax.set_xlabel("epoch (all phases)")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _write_outputs(run: RunDir, job: TrainJob, result, mcfg, seconds: float) -> Dict[str, Any]:
    from raybias.classify.loop import TrainState

    if result.checkpoint is None:
        raise StageFailed(f"training {job.method} (seed {job.seed}) reported no checkpoint")
    with result.checkpoint.as_directory() as d:
        state = TrainState.load(d)
    if state.result is None:
        raise StageFailed(f"training {job.method} (seed {job.seed}) ended before its final evaluation")
    out = classifier_dir(job.method, job.seed)
    train_meta = job.sets["train"].meta
    counts = train_meta["group"].value_counts()
    record = {
        "method": job.method, "seed": job.seed, "train_method": job.train_method,
        "best_epoch": state.result["best_epoch"], "best_phase": state.result["best_phase"],
        "val": state.result["val"], "test": state.result["test"],
        "history": state.history, "seconds": seconds, "train_seconds": state.train_seconds,
        "data_seconds": state.result.get("data_seconds"), "restarts": state.restarts,
        "n_train": int(len(train_meta)),
        "group_counts_train": {str(g): int(counts.get(g, 0)) for g in range(job.n_groups)},
        "group_names": job.group_names,
        "n_stage1": int(len(job.sets["stage1"])) if "stage1" in job.sets else None,
        "config": OmegaConf.to_container(mcfg.train, resolve=True),
    }
    if "stage2" in state.result:  # two_stage: which stage 2 ran (auto: every candidate's val WGA, the choice)
        record["stage2"] = state.result["stage2"]
    for name, data in sorted(state.artifacts.items()):
        run.write_bytes(f"{out}/{name}", data)
    run.write_bytes(curves_png(job.method, job.seed), _curves_png(state.history, f"{job.method} seed {job.seed}"))
    run.write_json(metrics_path(job.method, job.seed), record)
    return record


def _inputs(method: str, train_method: str) -> tuple:
    """The stages whose outputs a classifier reads: the real data, and its synthetic set (the
    filtered one of a generator; DDB's amplifier reads DDB's set, the recipes its outputs)."""
    gen = generator_of(method)
    if gen == DDB:
        return (PREPARE_KEY, DDB_GENERATE_KEY if train_method == "ddb_amplifier" else DDB_AMPLIFIER_KEY)
    return (PREPARE_KEY, filter_key(gen)) if gen else (PREPARE_KEY,)


def train_classifier(cfg, run: RunDir, method: str, seed: int, mode: str = "fresh", *,
                     info: Optional[DatasetInfo] = None, real: Optional[Dict[str, DataSet]] = None,
                     name: Optional[str] = None, callbacks=None) -> Dict[str, Any]:
    """Train (or skip, or resume) the classifier of one `methods:` entry and seed.

    `name` (default: the method) names its folder `classifiers/<name>/<seed>/` and stage key,
    so a sweep can keep variants of one method apart; `callbacks` go to Ray Train's RunConfig.

    Returns the metrics.json record.
    """
    from raybias.ray_utils import init_ray, require_gpus

    init_ray(cfg)
    mcfg = method_config(cfg, method)
    t = mcfg.train
    if t.method == "ddb_recipe2":  # also refused at config validation; method_config skips it
        from raybias.config import check_recipe2_workers

        check_recipe2_workers(t.num_workers)
    name = name or method
    key = train_key(name, seed)
    sections = train_sections(method)
    # partial: a killed trainer's checkpoints continue a run of the same config
    st = run.stage(key, mcfg, sections, mode, partial=True, owns=(classifier_dir(name, seed),),
                   outputs=(metrics_path(name, seed),), needs=_inputs(method, t.method))
    if st.skip:
        return json.loads(run.read_text(metrics_path(name, seed)))
    if t.use_gpu:
        require_gpus(1, f"train.use_gpu for {method}")
    check_pretrained(t.model, t.pretrained)
    info = info or DatasetInfo.load(run)
    job = build_job(cfg, run, method, seed, info, real)
    job.method = name
    if st.resumable and st.previous.get("hash"):
        # same work by RunDir.matches (e.g. only the CPU count changed): its checkpoint carries
        # the hash it was started under
        job.config_hash = st.previous["hash"]
    fault = faults.planned("train.epoch", [f"{name}/{seed}"])  # None outside the test suite
    trainer = _trainer(job, run, t, fault, callbacks)
    start = time.time()
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray Train wraps worker errors; keep the message readable
        raise StageFailed(f"training {method} (seed {seed}) failed: {_root_cause(exc)} "
                          f"(checkpoints kept in {run.path(classifier_dir(name, seed), trainer_name(name, seed))}; "
                          "rerun with --resume to continue)") from exc
    record = _write_outputs(run, job, result, mcfg, time.time() - start)
    run.delete(classifier_dir(name, seed), trainer_name(name, seed))
    st.finish({"test_wga": record["test"]["wga"], "val_wga": record["val"]["wga"]})
    return record


def max_concurrent_trainers(t) -> int:
    """How many trainers fit the cluster at once (train.max_concurrent overrides).

    Streaming (not in memory) keeps one CPU free for Ray Data's decode tasks, which
    would otherwise wait behind the trainers' workers forever.
    """
    from raybias.ray_utils import cluster_gpus, cpus_available

    if t.max_concurrent:
        return int(t.max_concurrent)
    per_trainer_cpu = max(1e-6, float(t.cpus_per_worker) * int(t.num_workers))
    cpus = cpus_available() - (0 if t.in_memory else 1)
    n = int(math.floor(cpus / per_trainer_cpu + 1e-9))
    if t.use_gpu:
        n = min(n, int(cluster_gpus() // max(1, int(t.num_workers))))
    return max(1, n)


def train_methods(cfg, run: RunDir, methods: Sequence[str], seeds: Iterable[int], mode: str = "fresh",
                  progress: bool = True) -> Dict[Tuple[str, int], Dict[str, Any]]:
    """Train every (method, seed) pair, several trainers at once; {(method, seed): record}.

    A failing pair does not stop the others; the failures are raised together afterwards
    as one StageFailed (what finished is recorded and kept).
    """
    from raybias.console import bar as progress_bar

    from raybias.ray_utils import init_ray, run_trainers

    init_ray(cfg)
    pairs = [(m, int(s)) for m in methods for s in seeds]
    for m in dict.fromkeys(methods):  # fail fast on what is checkable before any trainer starts
        t = method_config(cfg, m).train
        check_pretrained(t.model, t.pretrained)
    info = DatasetInfo.load(run)
    real = real_sets(run)
    width = min(len(pairs), max_concurrent_trainers(cfg.train)) or 1
    results: Dict[Tuple[str, int], Dict[str, Any]] = {}
    errors: List[Tuple[str, BaseException]] = []

    def done(pair, record) -> None:
        results[pair] = record
        bar.set_postfix_str(f"{pair[0]}/{pair[1]} test WGA {100 * (record['test']['wga'] or 0):.1f}", refresh=False)
        bar.update(1)

    def failed(pair, exc) -> None:
        errors.append((f"{pair[0]} seed {pair[1]}", exc))
        bar.update(1)

    with progress_bar(total=len(pairs), desc="classifiers", unit="run", disable=not progress) as bar:
        run_trainers(pairs, lambda p: train_classifier(cfg, run, p[0], p[1], mode, info=info, real=real), width,
                     name="raybias-train", on_done=done, on_error=failed)
    if len(errors) == 1:
        raise errors[0][1]
    if errors:
        raise StageFailed(f"{len(errors)} of {len(pairs)} classifiers failed: "
                          + "; ".join(f"{what}: {exc}" for what, exc in errors))
    return {p: results[p] for p in pairs}
