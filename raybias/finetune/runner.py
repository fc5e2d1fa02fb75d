"""Fine-tuning's driver: one diffusion model per group (LoRA, DreamBooth) or per (group, cluster).

The `finetune` stage (raybias/stages/finetune.py) begins each generator's stage, plans it
(`plan_generator`) and hands the plans to `train_generators`; DDB's model is one more job
through `run_job`. Each job is its own Ray Train `TorchTrainer` (one worker sized by finetune.num_cpus_per_job /
num_gpus_per_job), checkpointing into `generators/<gen>/_train/<job>` under the run
directory; a failed worker restarts from its last checkpoint (`FailureConfig`), and a killed
run continues with `--resume`: finished jobs are work units in the manifest and are not
trained again, unfinished ones resume from their Ray Train checkpoint. The jobs of every
generator being fine-tuned are launched together, as many at once as the cluster holds.
With finetune.jobs_per_trainer > 1 a trainer trains a pack of jobs in turn (`make_packs`),
paying Ray Train's start-up and the base model's loading once per pack.

Writes, per generator:
  generators/<gen>/<g>[-c<k>]/      the model (LoRA weights or a DreamBooth pipeline folder),
                                    training.json (loss per step, attempts, timings), previews
  generators/<gen>/manifest.json    the contract with `generate` (read_generator_manifest)
  generators/<gen>/samples.png      base vs. fine-tuned samples per model
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from raybias.config import ConfigError
from raybias.console import say
from raybias.data.info import DatasetInfo
from raybias.data.io import TableMissing, read_table
from raybias import faults
from raybias.finetune.spec import (FinetuneJob, FinetuneSpec, ModelEntry, TrainerWork, WorkItem, base_model,
                                   finetune_spec, model_name, prompt_template)
from raybias.layout import (CLUSTERS_PARQUET, REAL, fault_marker, finetune_key, finetune_storage, generator_manifest,
                            generator_samples, model_dir, preview_png, previews_json, training_json)
from raybias.ray_utils import cpus_available, cluster_gpus, run_trainers
from raybias.registry import GENERATORS, finetuned_generators
from raybias.rundir import RunDir, Stage, StageFailed

log = logging.getLogger("raybias")

# Test hook: "<job>:<step>" (or "<generator>/<job>:<step>") kills that job's worker once after
# the step, so tests can check recovery from the last checkpoint.


# --------------------------------------------------------------------------- planning


@dataclass
class GeneratorPlan:
    generator: str
    jobs: List[FinetuneJob]
    models: List[ModelEntry]  # the manifest's models, results filled in after training
    group_counts: Dict[int, int] = field(default_factory=dict)

    @property
    def entries(self) -> List[Dict[str, Any]]:
        """The models as the manifest's JSON writes them."""
        return [m.to_dict() for m in self.models]


def real_train_ids(run: RunDir) -> Dict[int, List[str]]:
    real = read_table(run, REAL, columns=["id", "group", "split"], stage="prepare", split="train")
    return {int(g): list(part["id"]) for g, part in real.groupby("group")}


def _clusters(run: RunDir, train_ids: Dict[int, List[str]]) -> Dict[int, Dict[int, List[str]]]:
    """group -> cluster -> ids (training images only), from embed/clusters.parquet."""
    import pyarrow.parquet as pq

    if not run.exists(CLUSTERS_PARQUET):
        raise TableMissing(f"{run.path(CLUSTERS_PARQUET)} does not exist: clustered_dreambooth needs the "
                           "clusters of each group (run `raybias embed` and `raybias cluster` first)")
    table = pq.read_table(run.path(CLUSTERS_PARQUET), filesystem=run.fs).to_pandas()
    missing = {"id", "group", "cluster"} - set(table.columns)
    if missing:
        from raybias.data.schema import SchemaError

        raise SchemaError(f"{run.path(CLUSTERS_PARQUET)}: missing column(s) {', '.join(sorted(missing))}; "
                          "it needs id, group, cluster")
    out: Dict[int, Dict[int, List[str]]] = {}
    for g, ids in train_ids.items():
        wanted = set(ids)
        part = table[(table["group"] == g) & table["id"].isin(wanted)].sort_values("id", kind="stable")
        out[g] = {int(c): list(p["id"]) for c, p in part.groupby("cluster")}
    return out


def plan_generator(cfg, run: RunDir, info: DatasetInfo, generator: str,
                   train_ids: Optional[Dict[int, List[str]]] = None) -> GeneratorPlan:
    """The jobs of one generator and its manifest entries (trained and borrowed models).

    A group with fewer than finetune.min_images real training images (or none) is not
    trained: it borrows the model(s) of its class's best-stocked trained group, with the
    identifier dropped, its own bias word in the prompt and the source's bias word as the
    negative prompt (Basu et al.).
    """
    if generator not in finetuned_generators():
        raise ConfigError(f"generator {generator!r} is not fine-tuned: fine-tuned generators are "
                          + ", ".join(finetuned_generators()))
    ft = cfg.finetune
    kind = GENERATORS[generator].model
    identifier = ft.identifier if GENERATORS[generator].identifier else None
    ids = train_ids if train_ids is not None else real_train_ids(run)
    counts = {g: len(ids.get(g, [])) for g in range(info.n_groups)}
    clusters = _clusters(run, ids) if GENERATORS[generator].clusters else None
    min_images = max(1, int(ft.min_images))
    trained = [g for g in range(info.n_groups) if counts[g] >= min_images]

    jobs: List[FinetuneJob] = []
    entries: List[ModelEntry] = []
    for g in trained:
        y, a = info.y_a(g)
        members = list(info.class_words[y])
        if clusters is None:
            parts = [(None, ids[g])]
        else:
            if not clusters.get(g):
                raise TableMissing(f"{run.path(CLUSTERS_PARQUET)} has no clusters for group {g} "
                                   f"({info.group_name(g)}, {counts[g]} training images); rerun `raybias cluster`")
            parts = sorted(clusters[g].items())
        total = sum(len(p) for _, p in parts)
        for c, part_ids in parts:
            job = FinetuneJob(
                name=model_name(g, c), generator=generator, kind=kind, group=g, cluster=c,
                prompt_template=prompt_template(info, g, identifier=identifier), members=members,
                ids=list(part_ids),
                class_template=prompt_template(info, g) if kind == "dreambooth" else None)
            jobs.append(job)
            entries.append(ModelEntry(
                name=job.name, y=y, bias=a, group=g, kind=kind, folder=model_dir(generator, job.name),
                prompt_template=job.prompt_template, members=list(members), cluster=c,
                weight=float(len(part_ids) / total), n_images=len(part_ids), group_images=int(counts[g])))

    by_name = {j.name: j for j in jobs}
    for g in range(info.n_groups):
        if g in trained:
            continue
        y, a = info.y_a(g)
        sources = [s for s in trained if info.y_a(s)[0] == y]
        if not sources:
            have = ", ".join(f"{info.group_name(s)}: {counts[s]}" for s in range(info.n_groups)
                             if info.y_a(s)[0] == y)
            raise StageFailed(
                f"{generator}: class {info.class_names[y]!r} has no group with at least finetune.min_images="
                f"{min_images} real training images to fine-tune on or borrow from ({have}); lower "
                "finetune.min_images or use a milder data.severity")
        src = max(sources, key=lambda s: (counts[s], -s))
        _, a_src = info.y_a(src)
        template = prompt_template(info, g)  # identifier dropped, this group's bias word
        negative = info.bias_words[a_src] if info.bias_words[a_src] != info.bias_words[a] else None
        for src_entry in [e for e in entries if e.group == src and e.borrowed_from is None]:
            name = model_name(g, src_entry.cluster)
            entries.append(replace(src_entry, name=name, group=g, bias=a, prompt_template=template,
                                   negative_prompt=negative, borrowed_from=src_entry.name,
                                   group_images=int(counts[g])))
            by_name[src_entry.name].borrower_previews.append(
                {"name": f"{name} (borrowed)", "prompt_template": template, "negative_prompt": negative})
    entries.sort(key=lambda e: (e.group, -1 if e.cluster is None else e.cluster))
    return GeneratorPlan(generator, jobs, entries, counts)


# --------------------------------------------------------------------------- progress


def progress_board_class():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        """Where job workers post (step, loss); the driver polls it for its progress display."""

        def __init__(self):
            self.state: Dict[str, Dict[str, Any]] = {}
            self.version = 0  # bumped at every update; each entry keeps the version it was set at

        def update(self, generator, name, step, total, loss, phase):
            self.version += 1
            self.state[f"{generator}/{name}"] = {"step": step, "total": total, "loss": loss, "phase": phase,
                                                 "time": time.time(), "version": self.version}

        def snapshot(self, since: int = 0):
            """(version now, the entries updated after version `since`): a poll costs what
            changed since the last one, not one entry per job of the stage."""
            return self.version, {k: s for k, s in self.state.items() if s["version"] > since}

    return ProgressBoard


class ProgressMonitor:
    """One progress bar over all jobs' steps on the terminal, plus a line per job now and then
    in the log ("[lora g1] step 120/300 loss 0.083"; on the terminal with -v)."""

    def __init__(self, board, total_steps: int, interval_s: float = 1.0, line_every_s: float = 15.0):
        from raybias.console import bar

        self.board = board
        self.bar = bar(total=total_steps, desc="fine-tuning", unit="step")
        self.interval_s, self.line_every_s = interval_s, line_every_s
        self.seen: Dict[str, int] = {}
        self.last_line: Dict[str, Tuple[float, str]] = {}
        self.version = 0  # the board's version at the last poll
        self.training: Dict[str, Dict[str, Any]] = {}  # jobs now training: their latest state
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="raybias-finetune-progress")

    def start(self) -> "ProgressMonitor":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> None:
        import ray

        try:
            self.version, changed = ray.get(self.board.snapshot.remote(self.version), timeout=10)
        except Exception:  # the display must never break training
            return
        now = time.time()
        for key, s in sorted(changed.items()):
            advance = s["step"] - self.seen.get(key, 0)
            if advance > 0:
                self.bar.update(advance)
                self.seen[key] = s["step"]
            if s["phase"] == "training":
                self.training[key] = s
            else:
                self.training.pop(key, None)
                self._line(key, s, now)
        # a line per training job every line_every_s; finished jobs said "done" once, above
        for key, s in sorted(self.training.items()):
            self._line(key, s, now)
        if self.training:
            self.bar.set_postfix_str(", ".join(sorted(self.training))[:60], refresh=False)

    def _line(self, key: str, s: Dict[str, Any], now: float) -> None:
        last_t, last_phase = self.last_line.get(key, (0.0, ""))
        if s["phase"] != last_phase or now - last_t >= self.line_every_s:
            gen, name = key.split("/", 1)
            loss = "" if s["loss"] is None else f" loss {s['loss']:.4f}"
            log.info("[%s %s] step %d/%d%s (%s)", gen, name, s["step"], s["total"], loss, s["phase"])
            self.last_line[key] = (now, s["phase"])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll()
        self.bar.close()


# --------------------------------------------------------------------------- running jobs


def _capacity(ft) -> int:
    """Trainers the cluster can run at once."""
    if ft.num_gpus_per_job > 0:
        cap = int(math.floor(cluster_gpus() / ft.num_gpus_per_job + 1e-9))
    else:
        cap = int(math.floor(cpus_available() / ft.num_cpus_per_job + 1e-9))
    if ft.max_concurrent_jobs:
        cap = min(cap, int(ft.max_concurrent_jobs))
    return max(1, cap)


def _fault_for(generator: str, job: str, run: RunDir) -> Optional[Dict[str, Any]]:
    """The test suite's armed kill for this job (raybias.faults), else None."""
    if not run.is_local:
        return None
    return faults.planned("finetune.step", [job, f"{generator}/{job}"],
                          marker=run.local_path(fault_marker(generator, job)))


def run_job(cfg, run: RunDir, job: FinetuneJob, spec: FinetuneSpec, board=None) -> Dict[str, Any]:
    """Train one job on Ray Train; returns its training record (training.json)."""
    return _run_trainer(cfg, run, [WorkItem(job, spec)], board)[job.key]


def pack_name(index: int, n_packs: int) -> str:
    return f"pack-{index}-of-{n_packs}"


def _run_trainer(cfg, run: RunDir, items: List[WorkItem], board,
                 name: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
    """Train one job, or a pack of jobs in turn, in one Ray Train trainer; returns {job.key: record}."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raybias.finetune.loop import train_loop_per_worker

    f = cfg.finetune
    use_gpu = f.num_gpus_per_job > 0
    resources = {"CPU": float(f.num_cpus_per_job)}
    if use_gpu:
        resources["GPU"] = float(f.num_gpus_per_job)
    jobs = [item.job for item in items]
    first = jobs[0]
    armed = [replace(item, fault=_fault_for(item.job.generator, item.job.name, run)) for item in items]
    storage = run.path(finetune_storage(first.generator))
    start = time.time()
    work = TrainerWork(items=armed, use_gpu=use_gpu, threads=max(1, int(f.num_cpus_per_job)), launched_at=start,
                       board=board)
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={"work": work},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name or first.name, storage_path=storage, storage_filesystem=run.fs,
            failure_config=FailureConfig(max_failures=int(f.max_failures)),
            checkpoint_config=CheckpointConfig(num_to_keep=1)))
    trainer.fit()  # raises when the trainer failed more than max_failures times
    wall = time.time() - start
    records = {}
    for job in jobs:
        rel = training_json(job.generator, job.name)
        if not run.exists(rel):
            raise StageFailed(f"{job.generator} {job.name}: training finished but {run.path(rel)} was not written")
        record = run.read_json(rel)
        # a packed job: the trainer's wall time is shared; its own is setup + training + previews
        record["wall_seconds"] = round(wall if len(jobs) == 1 else sum(
            float(record.get(k, 0.0)) for k in ("startup_seconds", "setup_seconds", "train_seconds",
                                                "preview_seconds")), 3)
        records[job.key] = record
    return records


def make_packs(work: List[WorkItem], jobs_per_trainer: int) -> List[List[WorkItem]]:
    """Deal the jobs (in launch order) into ceil(n / jobs_per_trainer) packs, round-robin, so the
    packs are alike in size and mix groups. Made from the whole plan, finished jobs included,
    so a resumed run rebuilds the same packs and finds each pack's trainer checkpoint."""
    n_packs = max(1, math.ceil(len(work) / max(1, jobs_per_trainer)))
    return [work[i::n_packs] for i in range(n_packs)]


def _interleave_groups(work: List[WorkItem]) -> List[WorkItem]:
    """Launch order: round-robin over (generator, group), so the clusters of one group do not
    start together and the later ones find the group's prior-preservation images cached."""
    queues: Dict[Tuple[str, int], List[WorkItem]] = {}
    for item in work:
        queues.setdefault((item.job.generator, item.job.group), []).append(item)
    out: List[WorkItem] = []
    while any(queues.values()):
        for q in queues.values():
            if q:
                out.append(q.pop(0))
    return out


def _run_all(cfg, run: RunDir, trainers: List[Tuple[str, List[WorkItem]]],
             on_done, total_steps: int) -> Dict[str, Exception]:
    """Run every trainer (a name and its one job or pack of jobs), as many at once as the
    cluster holds; `on_done([(job, record), ...])` once per trainer as it finishes, with its
    finished jobs (one call for a whole pack: its bookkeeping is one manifest write, not one
    per job)."""
    import ray

    errors: Dict[str, Exception] = {}
    if not trainers:
        return errors
    board = progress_board_class().remote()
    monitor = ProgressMonitor(board, total_steps).start()

    def done(item, records) -> None:
        on_done([(w.job, records[w.job.key]) for w in item[1]])

    def failed(item, exc) -> None:
        # a pack's jobs published before the failure are kept; the others failed
        unit, kept = item[1], []
        for job in (w.job for w in unit):
            if len(unit) > 1 and run.exists(training_json(job.generator, job.name)):
                kept.append((job, run.read_json(training_json(job.generator, job.name))))
            else:
                errors[job.key] = exc
        if kept:
            on_done(kept)

    try:
        run_trainers(trainers, lambda item: _run_trainer(cfg, run, item[1], board, item[0]), _capacity(cfg.finetune),
                     name="raybias-finetune", on_done=done, on_error=failed)
    finally:
        monitor.close()
        ray.kill(board)
    return errors


# --------------------------------------------------------------------------- outputs


# A thousand per-cluster models make no sheet anyone reads, and a figure of one subplot per
# row cost matplotlib's layout ~M^4 (184 s at 200 models). The sheet shows an even sample of
# at most this many models, drawn as one image; every model keeps its own preview files.
MAX_PREVIEW_MODELS = 32


def preview_sample(names: Sequence[str], limit: int = MAX_PREVIEW_MODELS) -> List[str]:
    """At most `limit` of `names`, evenly spread, in their order (all of them if fewer)."""
    names = list(names)
    if len(names) <= limit:
        return names
    step = len(names) / limit
    return [names[int(i * step)] for i in range(limit)]


def write_samples_png(run: RunDir, generator: str, names: Sequence[str]) -> None:
    """The generator's samples.png: per trained model (an even sample of at most
    MAX_PREVIEW_MODELS), the base model's and its own samples. Cost O(models shown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raybias.data.images import decode

    shown = preview_sample(names)
    rows: List[Tuple[str, np.ndarray]] = []
    for name in shown:
        if not run.exists(previews_json(generator, name)):
            continue
        labels = json.loads(run.read_text(previews_json(generator, name)))
        for k, label in enumerate(labels):
            rows.append((f"{name}: {label}", decode(run.read_bytes(preview_png(generator, name, k)))))
    if not rows:
        return
    width = max(r.shape[1] for _, r in rows)
    height = max(r.shape[0] for _, r in rows)
    gap = max(1, height // 16)
    sheet = np.full((len(rows) * (height + gap), width, 3), 255, np.uint8)
    for i, (_, img) in enumerate(rows):
        sheet[i * (height + gap):i * (height + gap) + img.shape[0], :img.shape[1]] = img
    fig, ax = plt.subplots(figsize=(max(3.0, width / height * 0.9), 0.9 * len(rows) + 0.4))
    ax.imshow(sheet, interpolation="nearest", aspect="auto")
    ax.set_xticks([])
    ax.set_yticks([i * (height + gap) + height / 2 for i in range(len(rows))])
    ax.set_yticklabels([label for label, _ in rows], fontsize=7)
    ax.tick_params(length=0)
    more = f" ({len(shown)} of {len(names)} models)" if len(shown) < len(names) else ""
    ax.set_title(f"{generator}: samples before / after fine-tuning{more}", fontsize=9)
    run.write_figure(generator_samples(generator), fig)
    plt.close(fig)


def _manifest(cfg, generator: str, plan: GeneratorPlan, records: Dict[str, Dict[str, Any]], base: str):
    models = []
    for e in plan.models:
        rec = records[e.borrowed_from or e.name]
        models.append(replace(e, steps=int(rec["steps"]), final_loss=float(rec["final_loss"])).to_dict())
    return {"generator": generator, "base": cfg.base.model, "base_resolved": base,
            "identifier": cfg.finetune.identifier if GENERATORS[generator].identifier else None,
            "models": models}


# --------------------------------------------------------------------------- entry points


def train_generators(cfg, run: RunDir, pending: Sequence[Tuple[str, GeneratorPlan, Stage]]) -> Dict[str, Dict]:
    """Train the planned jobs of several generators (each with its begun, not skipped stage)
    with one pool of trainers; write each generator's manifest and finish its stage; returns
    {generator: its manifest}. Jobs the stage records as finished are not trained again."""
    out: Dict[str, Dict] = {}
    base, base_folder = base_model(cfg, run)
    records: Dict[str, Dict[str, Dict[str, Any]]] = {gen: {} for gen, _, _ in pending}
    every_job: List[WorkItem] = []
    finished = set()
    for gen, plan, st in pending:
        spec = finetune_spec(cfg, run, GENERATORS[gen].model, base=(base, base_folder))
        for job in plan.jobs:
            every_job.append(WorkItem(job, spec))
            record = training_json(job.generator, job.name)
            if job.name in st.done_units and run.exists(record):
                records[gen][job.name] = run.read_json(record)  # finished earlier: not trained again
                finished.add(job.key)
    every_job = _interleave_groups(every_job)
    todo = [w for w in every_job if w.job.key not in finished]
    per_trainer = int(cfg.finetune.jobs_per_trainer)
    if per_trainer > 1:
        packs = make_packs(every_job, per_trainer)
        trainers = [(pack_name(i, len(packs)), pack) for i, pack in enumerate(packs)
                    if any(w.job.key not in finished for w in pack)]
    else:
        trainers = [(w.job.name, [w]) for w in todo]
    skipped = sum(len(r) for r in records.values())
    say(f"finetune: {len(todo)} job(s) to train" + (f", {skipped} finished earlier" if skipped else "")
        + (f", in {len(trainers)} trainer(s)" if per_trainer > 1 else "")
          + f" ({', '.join(g for g, _, _ in pending)}; base {base})", flush=True)

    stages = {gen: st for gen, _, st in pending}
    lock = threading.Lock()

    def on_done(finished: List[Tuple[FinetuneJob, Dict[str, Any]]]) -> None:
        with lock:  # trainers' threads report here
            names: Dict[str, List[str]] = {}
            for job, record in finished:
                records[job.generator][job.name] = record
                names.setdefault(job.generator, []).append(job.name)
            for gen, done in names.items():  # one manifest write per trainer, not per job
                stages[gen].unit_done(*done)

    started = time.time()
    errors = _run_all(cfg, run, trainers, on_done, total_steps=int(cfg.finetune.steps) * len(todo))
    failed_gens = {name.split("/", 1)[0] for name in errors}
    for gen, plan, st in pending:
        if gen in failed_gens:
            continue
        manifest = _manifest(cfg, gen, plan, records[gen], base)
        run.write_json(generator_manifest(gen), manifest)
        try:  # a preview never stands in the way of the stage's result
            write_samples_png(run, gen, [j.name for j in plan.jobs])
        except Exception as exc:
            log.warning("fine-tuning %s: its samples.png was not written (%s)", gen, exc)
        trained = [records[gen][j.name] for j in plan.jobs]
        st.finish({
            "trained": len(plan.jobs), "borrowed": sum(1 for e in plan.models if e.borrowed_from),
            "wall_seconds": round(time.time() - started, 2),
            "job_wall_seconds": {r["name"]: r.get("wall_seconds") for r in trained},
            "seconds_per_step": {r["name"]: r.get("seconds_per_step") for r in trained},
        })
        out[gen] = manifest
        print_summary(gen, manifest, records[gen])
    if errors:
        lines = [f"  {name}: {type(exc).__name__}: {_short(exc)}" for name, exc in sorted(errors.items())]
        raise StageFailed(f"finetune: {len(errors)} job(s) failed (finished jobs are kept; rerun with --resume "
                          "to train only the rest):\n" + "\n".join(lines))
    return out


def _short(exc: Exception, limit: int = 400) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " ..."


# At most this many models get a line of their own in the stage's summary (a thousand
# per-cluster models would be a thousand lines); the manifest lists them all.
MAX_SUMMARY_LINES = 24


def print_summary(gen: str, manifest: Dict[str, Any], records: Dict[str, Dict[str, Any]]) -> None:
    say(f"{finetune_key(gen)}: {len(manifest['models'])} model(s)")
    shown = manifest["models"]
    if len(shown) > MAX_SUMMARY_LINES:
        keep = set(preview_sample(range(len(shown)), MAX_SUMMARY_LINES))
        shown = [m for i, m in enumerate(shown) if i in keep]
    for m in shown:
        rec = records.get(m["borrowed_from"] or m["name"], {})
        how = (f"borrows {m['borrowed_from']} (negative prompt {m['negative_prompt']!r})" if m["borrowed_from"]
               else f"{m['n_images']} images, {m['steps']} steps, loss {m['final_loss']:.4f}, "
                    f"{rec.get('wall_seconds', 0):.1f}s")
        say(f"  {m['name']:<8} weight {m['weight']:.2f}  {m['prompt_template']!r:<28} {how}")
    if len(shown) < len(manifest["models"]):
        steps = [m["steps"] for m in manifest["models"] if not m["borrowed_from"]]
        losses = [m["final_loss"] for m in manifest["models"] if not m["borrowed_from"]]
        say(f"  ... {len(shown)} of {len(manifest['models'])} models shown; all {len(steps)} trained for "
            f"{min(steps)}-{max(steps)} steps, final loss {min(losses):.4f}-{max(losses):.4f} "
            f"({generator_manifest(gen)} lists them)")
