"""The training function every Ray Train worker runs (`train_loop_per_worker`).

One loop for every recipe: the recipe (raybias/classify/recipes.py) supplies the phases and
hooks. Per epoch: a seeded draw of rows (permutation or weighted), seeded augmentation, a
cosine learning rate per step, the validation metrics, a checkpoint reported with
`ray.train.report` (rank 0 writes it). A restarted worker group, or a new trainer on the same
storage, resumes from `ray.train.get_checkpoint()` at the next epoch; since every random draw
is derived from (seed, phase, epoch), a resumed run repeats an uninterrupted one exactly.
The model of the epoch with the best validation WGA (ties: AGA) in the selecting phase is
kept and evaluated on test at the end; the final report's checkpoint holds `result.json`,
`model.safetensors` and the method's artifacts, which the driver copies to the run directory.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from raybias.allocator import keep_freed_memory
from raybias.faults import strike
from raybias.classify.data import (DataSet, InMemorySet, ParquetRows, StreamSet, augment, epoch_draw,
                                   generator, load_images)
from raybias.classify.recipes import LossInput, Phase, choose_stage2, get_method
from raybias.classify.metrics import metrics_from_counts, selection_key
from raybias.classify.models import (Classifier, build_model, model_bytes, state_from_safetensors,
                                     state_to_safetensors)
from raybias.layout import CLASSIFIER_MODEL

EVAL_BATCH = 512
TRAIN_SETS = ("train", "stage1")  # data sets that phases train on (streamed through Ray Data)


@dataclass
class TrainJob:
    """Everything a worker needs (picklable; built by raybias/classify/runner.py)."""

    run_spec: str
    method: str  # the `methods:` entry (e.g. "groupdro", or a generator name for two_stage)
    train_method: str  # the registered hook name (erm, ..., two_stage)
    seed: int
    train: Dict[str, Any]  # the config's train section as a plain dict
    n_classes: int
    n_groups: int
    group_names: List[str]
    image_size: int
    sets: Dict[str, DataSet]
    method_state: Dict[str, Any] = field(default_factory=dict)
    torch_threads: int = 1
    config_hash: str = ""


class WorkerContext:
    """What hooks see: data sets, config, the method's state, predictions, artifacts."""

    def __init__(self, job: TrainJob, rank: int, world: int, device: torch.device):
        from omegaconf import OmegaConf

        self.job = job
        self.train = OmegaConf.create(job.train)
        self.sets = job.sets
        self.rank = rank
        self.world = world
        self.device = device
        self.n_groups = job.n_groups
        self.method_state: Dict[str, Any] = {}
        self.artifacts: Dict[str, bytes] = {}
        self.data: Dict[str, Any] = {}  # name -> InMemorySet / StreamSet
        self.model: Optional[Classifier] = None
        self.train_groups: Optional[np.ndarray] = None
        self.n_train_groups = job.n_groups

    def predict(self, name: str) -> np.ndarray:
        """Predicted class of every row of data set `name` (eval mode, no augmentation)."""
        n = len(self.sets[name])
        pred = torch.zeros(n, dtype=torch.int64)
        model = self.model
        model.eval()
        with torch.no_grad():
            for b in self.data[name].eval_batches(EVAL_BATCH, self.rank, self.world):
                x = b.images.to(self.device).float() / 255.0
                pred[b.rows] = model(x).argmax(1).cpu()
        if self.world > 1:  # each row was predicted by exactly one rank
            import torch.distributed as dist

            dist.all_reduce(pred)
        return pred.numpy()

    def add_artifact(self, name: str, obj: Any) -> None:
        data = obj if isinstance(obj, bytes) else (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
        self.artifacts[name] = data

    def add_model_artifact(self, name: str) -> None:
        self.artifacts[name] = model_bytes(self.model, self.train.model)


# --- helpers ------------------------------------------------------------------------------

def cosine_lr(base: float, step: int, total: int, schedule: str) -> float:
    if schedule == "constant" or total <= 0:
        return base
    return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def make_optimizer(params, t, lr: float, optimizer: Optional[str] = None,
                   weight_decay: Optional[float] = None) -> torch.optim.Optimizer:
    """train.optimizer / train.weight_decay unless the phase names its own (JTT's)."""
    kind = optimizer or t.optimizer
    wd = float(t.weight_decay if weight_decay is None else weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    return torch.optim.Adam(params, lr=lr, weight_decay=wd)


def sync_buffers(model: torch.nn.Module, world: int) -> None:
    """BatchNorm statistics from rank 0 on every rank (DDP ranks drift after the last step)."""
    if world > 1:
        import torch.distributed as dist

        for buf in model.buffers():
            dist.broadcast(buf, 0)


def evaluate(model: Classifier, data, meta, n_groups: int, device, rank: int, world: int) -> Dict[str, Any]:
    """Per-group accuracy, WGA, AGA, accuracy and mean CE of `model` on a data set."""
    correct = torch.zeros(n_groups, dtype=torch.float64)
    total = torch.zeros(n_groups, dtype=torch.float64)
    loss_sum = torch.zeros(1, dtype=torch.float64)
    y_all = torch.from_numpy(np.array(meta["y"], dtype=np.int64))
    g_all = torch.from_numpy(np.array(meta["group"], dtype=np.int64))
    model.eval()
    with torch.no_grad():
        for b in data.eval_batches(EVAL_BATCH, rank, world):
            x = b.images.to(device).float() / 255.0
            logits = model(x).cpu()
            y, g = y_all[b.rows], g_all[b.rows]
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            correct += torch.bincount(g, weights=(logits.argmax(1) == y).double(), minlength=n_groups)
            total += torch.bincount(g, minlength=n_groups).double()
    if world > 1:
        import torch.distributed as dist

        for t in (correct, total, loss_sum):
            dist.all_reduce(t)
    out = metrics_from_counts(correct.numpy(), total.numpy())
    out["loss"] = float(loss_sum.item() / max(1.0, total.sum().item()))
    return out


def _better(new: Dict[str, Any], best: Optional[Dict[str, Any]]) -> bool:
    return best is None or selection_key(new) > selection_key(best)


def _synced(batches, world: int):
    """Yield batches while every rank still has one (DDP ranks must take the same steps);
    then drain this rank's iterator so Ray Data's split stays in step."""
    if world == 1:
        yield from batches
        return
    import torch.distributed as dist

    it = iter(batches)
    while True:
        b = next(it, None)
        flag = torch.tensor([0 if b is None else 1], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if int(flag.item()) == 0:
            for _ in it:
                pass
            return
        yield b


# --- state --------------------------------------------------------------------------------

@dataclass
class TrainState:
    phase: int = 0
    epoch: int = 0  # finished epochs of `phase`
    step: int = 0  # optimizer steps in `phase` (for the learning-rate schedule)
    model: Optional[Dict[str, torch.Tensor]] = None
    optimizer: Optional[Dict[str, Any]] = None
    loss_hook: Dict[str, Any] = field(default_factory=dict)
    best: Optional[Dict[str, torch.Tensor]] = None
    best_info: Optional[Dict[str, Any]] = None  # {phase, epoch, val}
    # stage-2 candidates: name -> {epoch, val} of its best epoch so far, final: the last epoch's
    # val (+ test once it ended); with several, the running phase's best weights are kept until
    # it ends, and become `best` if the candidate is then the one chosen so far
    candidates: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    phase_best: Optional[Dict[str, torch.Tensor]] = None
    history: List[Dict[str, Any]] = field(default_factory=list)
    method_state: Dict[str, Any] = field(default_factory=dict)
    artifacts: Dict[str, bytes] = field(default_factory=dict)
    train_seconds: float = 0.0
    restarts: int = 0
    config_hash: str = ""
    result: Optional[Dict[str, Any]] = None  # set when training finished

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        if self.model is not None:
            with open(os.path.join(folder, "model.safetensors"), "wb") as f:
                f.write(state_to_safetensors(self.model))
        for name, weights in (("best.safetensors", self.best), ("phase_best.safetensors", self.phase_best)):
            if weights is not None:
                with open(os.path.join(folder, name), "wb") as f:
                    f.write(state_to_safetensors(weights))
        # optimizer and hook state: tensors, numbers, strings, lists, dicts (weights_only load)
        torch.save({"optimizer": self.optimizer, "loss_hook": self.loss_hook,
                    "method_state": self.method_state}, os.path.join(folder, "state.pt"))
        progress = {k: getattr(self, k) for k in ("phase", "epoch", "step", "best_info", "candidates", "history",
                                                  "train_seconds", "restarts", "config_hash", "result")}
        with open(os.path.join(folder, "progress.json"), "w") as f:
            json.dump(progress, f)
        art = os.path.join(folder, "artifacts")
        os.makedirs(art, exist_ok=True)
        for name, data in self.artifacts.items():
            with open(os.path.join(art, name), "wb") as f:
                f.write(data)

    @classmethod
    def load(cls, folder: str) -> "TrainState":
        with open(os.path.join(folder, "progress.json")) as f:
            st = cls(**json.load(f))
        with open(os.path.join(folder, "model.safetensors"), "rb") as f:
            st.model = state_from_safetensors(f.read())
        for name, attr in (("best.safetensors", "best"), ("phase_best.safetensors", "phase_best")):
            path = os.path.join(folder, name)
            if os.path.exists(path):
                with open(path, "rb") as f:
                    setattr(st, attr, state_from_safetensors(f.read()))
        extra = torch.load(os.path.join(folder, "state.pt"), weights_only=True)
        st.optimizer, st.loss_hook, st.method_state = extra["optimizer"], extra["loss_hook"], extra["method_state"]
        art = os.path.join(folder, "artifacts")
        if os.path.isdir(art):
            for name in sorted(os.listdir(art)):
                with open(os.path.join(art, name), "rb") as f:
                    st.artifacts[name] = f.read()
        return st


def _cpu_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


# --- the loop -----------------------------------------------------------------------------

def _load_data(ctx: WorkerContext, names: List[str], in_memory: bool) -> None:
    import ray.train

    from raybias.rundir import RunDir

    if in_memory:
        run = RunDir(ctx.job.run_spec)
        cache: Dict[str, Any] = {}
        for name in names:
            ds = ctx.sets[name]
            ctx.data[name] = InMemorySet(ds.meta, load_images(run, ds, ctx.job.image_size, cache))
    else:
        for name in names:
            split = ray.train.get_dataset_shard(name) if name in TRAIN_SETS else None
            rows = ParquetRows(ctx.job.run_spec, ctx.sets[name], ctx.job.image_size)
            ctx.data[name] = StreamSet(ctx.sets[name].meta, split, rows)


def train_loop_per_worker(config: Dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from raybias.ray_utils import quiet_train_worker

    quiet_train_worker()  # no line per reported epoch
    job: TrainJob = config["job"]
    fault = config.get("fault")  # raybias.faults: None outside the test suite
    tc = ray.train.get_context()
    rank, world = tc.get_world_rank(), tc.get_world_size()
    torch.set_num_threads(max(1, int(job.torch_threads)))
    keep_freed_memory()  # no page faults on each step's activations (raybias/allocator.py)
    device = ray.train.torch.get_device()
    ctx = WorkerContext(job, rank, world, device)
    t = ctx.train
    method = get_method(job.train_method)
    phases: List[Phase] = method.phases(t)

    session_start = time.time()
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = TrainState.load(d)
        state.restarts += 1
        if state.config_hash and job.config_hash and state.config_hash != job.config_hash:
            raise RuntimeError(f"checkpoint under {tc.get_experiment_name()} was made with another config "
                               f"({state.config_hash} != {job.config_hash}); delete it or train fresh")
    else:
        state = TrainState(config_hash=job.config_hash, method_state=dict(job.method_state))
    ctx.method_state = state.method_state
    ctx.artifacts = state.artifacts

    names = sorted({p.data for p in phases} | {"val", "test"})
    _load_data(ctx, names, bool(t.in_memory))
    data_seconds = time.time() - session_start

    projection = method.projection(t)
    model = build_model(t.model, job.n_classes, t.pretrained, seed=job.seed, projection=projection)
    if state.model is not None:
        model.load_state_dict(state.model)
    model.to(device)
    ctx.model = model
    epochs_done_here = 0

    def report(metrics: Dict[str, Any], name: str) -> None:
        state.model = _cpu_state(model)
        state.train_seconds += time.time() - report.t0
        report.t0 = time.time()
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                state.save(d)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                                 checkpoint_dir_name=f"checkpoint-{name}")
        else:
            ray.train.report(metrics, checkpoint=None)

    report.t0 = session_start

    n_candidates = sum(1 for p in phases if p.candidate is not None)
    stage2_order = [p.candidate for p in phases if p.candidate is not None]
    stage2_rank = str(t.get("stage2_rank", "final"))
    for pi, phase in enumerate(phases):
        if pi < state.phase or state.result is not None:
            continue
        rng = pi if phase.rng_phase is None else int(phase.rng_phase)  # what the phase's draws derive from
        if state.epoch == 0:  # the phase starts now (again, if it was interrupted before its first epoch)
            state.step, state.optimizer, state.loss_hook = 0, None, {}
            if phase.start_from is not None:
                model.load_state_dict(state_from_safetensors(state.artifacts[phase.start_from]))
            if phase.reinit == "all":
                fresh = build_model(t.model, job.n_classes, t.pretrained, seed=job.seed, projection=projection)
                model.load_state_dict(fresh.state_dict())
            elif phase.reinit == "head":
                model.reset_head(generator(job.seed, rng, 7))
        for p in model.encoder.parameters():
            p.requires_grad_(not phase.freeze_encoder)
        data = ctx.data[phase.data]
        ctx.train_groups = np.asarray(method.train_groups(phase, ctx), dtype=np.int64)
        ctx.n_train_groups = max(job.n_groups, int(ctx.train_groups.max()) + 1 if len(ctx.train_groups) else 0)
        groups_t = torch.from_numpy(np.array(ctx.train_groups, dtype=np.int64))
        y_t = torch.from_numpy(np.array(ctx.sets[phase.data].meta["y"], dtype=np.int64))
        sampling = method.sample_weights(phase, ctx)
        weights, epoch_size = (None, len(data)) if sampling is None else sampling
        hook = method.loss_hook(phase, ctx)
        if state.loss_hook:
            hook.load_state_dict(state.loss_hook)
        if model.projection is not None:  # trained only where SupCon reads it (DDP wants no unused parameter)
            for p in model.projection.parameters():
                p.requires_grad_(hook.needs_features)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params, t, phase.lr, phase.optimizer, phase.weight_decay)
        if state.optimizer is not None:
            opt.load_state_dict(state.optimizer)
        net = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        per_worker_batch = max(2, int(t.batch_size) // world)
        total_steps = phase.epochs * max(1, math.ceil((epoch_size // world) / per_worker_batch))

        for epoch in range(state.epoch, phase.epochs):
            model.train()
            if phase.freeze_encoder:
                model.encoder.eval()  # BatchNorm statistics stay those of stage 1
            order = epoch_draw(len(data), weights, epoch_size, generator(job.seed, rng, epoch, 1))
            aug_gen = generator(job.seed, rng, epoch, 2, rank)
            batches = data.train_batches(order, per_worker_batch, generator(job.seed, rng, epoch, 3, rank), rank, world)
            loss_sum, n_seen = 0.0, 0
            epoch_start = time.time()
            for b in _synced(batches, world):
                lr = cosine_lr(phase.lr, state.step, total_steps, t.schedule)
                for gparam in opt.param_groups:
                    gparam["lr"] = lr
                x = b.images.to(device).float() / 255.0
                if t.augment:
                    x = augment(x, aug_gen)
                rows = b.rows
                out = net(x, with_features=hook.needs_features)
                logits, feats = out if hook.needs_features else (out, None)
                inp = LossInput(logits=logits, y=y_t[rows].to(device), groups=groups_t[rows].to(device),
                                rows=rows, features=feats, world_size=world)
                loss = hook(inp)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                state.step += 1
                loss_sum += float(loss.detach()) * len(rows)
                n_seen += len(rows)
            train_time = time.time() - epoch_start
            sync_buffers(model, world)
            if world > 1:  # epoch totals over all ranks
                import torch.distributed as dist

                tot = torch.tensor([loss_sum, float(n_seen)], dtype=torch.float64)
                dist.all_reduce(tot)
                loss_sum, n_seen = float(tot[0]), int(tot[1])
            val = evaluate(model, ctx.data["val"], ctx.sets["val"].meta, job.n_groups, device, rank, world)
            entry = {"phase": phase.name, "epoch": epoch + 1, "train_loss": loss_sum / max(1, n_seen),
                     "val_wga": val["wga"], "val_aga": val["aga"], "val_acc": val["acc"], "val_loss": val["loss"],
                     "lr": cosine_lr(phase.lr, state.step, total_steps, t.schedule), "examples": n_seen,
                     "train_time": train_time, "epoch_time": time.time() - epoch_start}
            entry.update(hook.log())
            state.history.append(entry)
            # several stage-2 candidates: a candidate competes for `best` once it has ended
            competing = phase.candidate is not None and n_candidates > 1
            if phase.select and not competing and _better(val, (state.best_info or {}).get("val")):
                state.best = _cpu_state(model)
                state.best_info = {"phase": phase.name, "epoch": epoch + 1, "val": val}
            if phase.candidate is not None:
                rec = state.candidates.setdefault(phase.candidate, {})
                if _better(val, rec.get("val")):
                    rec.update(epoch=epoch + 1, val=val)
                    if competing:
                        state.phase_best = _cpu_state(model)
                rec["final"] = val
            state.epoch = epoch + 1
            state.optimizer = opt.state_dict()
            state.loss_hook = hook.state_dict()
            report({k: v for k, v in entry.items() if not isinstance(v, list)}, f"p{pi}-e{epoch + 1:04d}")
            epochs_done_here += 1
            strike(fault, epochs_done_here, first_session=ckpt is None)
        if phase.candidate is not None and state.phase_best is not None:
            # the candidate's own best epoch on test, for the record only (the choice reads validation)
            rec = state.candidates[phase.candidate]
            model.load_state_dict(state.phase_best)
            rec["test"] = evaluate(model, ctx.data["test"], ctx.sets["test"].meta, job.n_groups, device, rank, world)
            ended = {c: r for c, r in state.candidates.items() if "test" in r}
            if choose_stage2(ended, stage2_order, stage2_rank) == phase.candidate:  # the one kept so far
                state.best = state.phase_best
                state.best_info = {"phase": phase.name, "epoch": rec["epoch"], "val": rec["val"]}
            state.phase_best = None
        method.end_phase(phase, ctx)
        state.phase, state.epoch, state.step = pi + 1, 0, 0
        state.optimizer, state.loss_hook = None, {}

    if state.result is None:
        if state.best is not None:
            model.load_state_dict(state.best)
        val = evaluate(model, ctx.data["val"], ctx.sets["val"].meta, job.n_groups, device, rank, world)
        test = evaluate(model, ctx.data["test"], ctx.sets["test"].meta, job.n_groups, device, rank, world)
        info = state.best_info or {"phase": phases[-1].name, "epoch": phases[-1].epochs}
        extra = method.result_info(t, state.candidates)
        chosen = (extra.get("stage2") or {}).get("chosen")
        if n_candidates > 1 and chosen is not None and info["phase"] != next(p.name for p in phases
                                                                             if p.candidate == chosen):
            raise RuntimeError(f"stage 2 kept the model of {info['phase']} but validation chose {chosen}")
        state.result = {"best_epoch": info["epoch"], "best_phase": info["phase"], "val": val, "test": test,
                        "data_seconds": data_seconds, **extra}
        state.artifacts[CLASSIFIER_MODEL] = model_bytes(model, t.model)
    # not "done": Tune reads that key as "stop this trial" and kills it before metrics.json is written
    report({"final": 1, "test_wga": state.result["test"]["wga"], "val_wga": state.result["val"]["wga"]}, "final")
