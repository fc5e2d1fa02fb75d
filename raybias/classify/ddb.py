"""Diffusing DeBias (Ciranni et al.) as hooks on the one classifier loop.

- `ddb_amplifier`: the bias amplifier. Trained on the DDB synthetic (bias-aligned) set only,
  so it never sees, let alone memorises, a real bias-conflicting image; its loss is LfF's
  generalised CE (q = ddb.lff_q), which leans on the easy (bias) cue even harder. No model
  selection: the last epoch is kept (validation needs bias labels to mean anything).
- `ddb_recipe1` (two-step): each real training image gets the pseudo group
  2·y + (amplifier wrong) — pseudo bias-aligned (amplifier right) or bias-conflicting
  (amplifier wrong) within its class — and Group-DRO with group-balanced sampling trains on
  those pseudo groups (`train_groups` replaces the true groups).
- `ddb_recipe2` (end-to-end): LfF reweighting with the amplifier as the fixed biased model:
  per-sample W = L_B / (L_B + L_D), L_B the amplifier's CE on the real image, L_D LfF's
  exponential moving average (ddb.lff_ema; a row's first visit stores its CE whole, as LfF's
  util.py `EMA` with its `updated` mask) of the debiased model's CE, each divided by the
  maximum over the sample's class; W is floored at ddb.lff_min_weight. Why the floor: LfF's
  biased model learns alongside the debiased one and is never perfectly sure, but the
  amplifier is fixed and (trained on bias-aligned images only) is sure of every real aligned
  image (CE ~1e-5 at severity 0.99), so W ~0 on all of them; the debiased model then fits the
  handful of pseudo-conflicting images alone and learns the reversed shortcut (test WGA 0,
  AGA 50 at 0.99 without the floor; 0.01 is about the conflicting share at that severity).

Bias labels: none of these reads the training set's `a` or `group`. Model selection is a
choice, `train.ddb_select_with_bias_labels`: true selects by validation WGA over the true
groups (the usual protocol, uses val bias labels); false replaces the validation groups by
the amplifier's pseudo groups as well, so selection (and the val metrics reported) are
pseudo-group WGA, and no bias label is read anywhere but in the test evaluation.

The amplifier's outputs on the real train and val images (`amplifier_outputs`) are computed
once by `raybias.stages.ddb` in a Ray task and stored as generators/ddb/amplifier/outputs.parquet
(id, split, y, pred, ce); the recipes read them in `prepare`.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from raybias.classify.recipes import GroupDRORecipe, LossHook, LossInput, Phase, Recipe
from raybias.layout import DDB, DDB_AMPLIFIER_OUTPUTS


def pseudo_groups(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """2·y + 1 where the amplifier is wrong (pseudo bias-conflicting), 2·y where it is right."""
    y = np.asarray(y, dtype=np.int64)
    return 2 * y + (np.asarray(pred, dtype=np.int64) != y).astype(np.int64)


class GeneralizedCE(LossHook):
    """LfF's GCE: CE_i · p_i(y)^q · q (gradient of (1 - p^q)/q), emphasising easy examples."""

    def __init__(self, q: float):
        self.q = float(q)

    def __call__(self, inp: LossInput) -> torch.Tensor:
        p = F.softmax(inp.logits, dim=1).gather(1, inp.y[:, None]).squeeze(1).detach()
        return (inp.per_sample_ce() * p.clamp_min(1e-8) ** self.q * self.q).mean()


class Amplifier(Recipe):
    """The bias amplifier: GCE on the DDB synthetic set only (data set "stage1")."""

    def phases(self, t):
        return [Phase("amplify", "stage1", int(t.epochs), float(t.lr))]

    def prepare(self, cfg, run, sets, seed):
        from raybias.classify.data import synthetic_set

        sets["stage1"] = synthetic_set(run, DDB)
        return {"q": float(cfg.ddb.lff_q)}

    def train_groups(self, phase, ctx):
        # synthetic rows carry group -1 (bias unknown); no group is used by this loss
        return np.zeros(len(ctx.sets[phase.data]), dtype=np.int64)

    def loss_hook(self, phase, ctx):
        return GeneralizedCE(ctx.method_state["q"])


def read_outputs(run) -> pd.DataFrame:
    from raybias.data.io import TableMissing

    if not run.exists(DDB_AMPLIFIER_OUTPUTS):
        raise TableMissing(f"{run.path(DDB_AMPLIFIER_OUTPUTS)} does not exist (run `raybias ddb` first: it trains "
                           "the bias amplifier whose predictions the DDB recipes use)")
    import pyarrow.parquet as pq

    return pq.read_table(run.path(DDB_AMPLIFIER_OUTPUTS), filesystem=run.fs).to_pandas()


def _aligned(meta: pd.DataFrame, out: pd.DataFrame, split: str, what: str) -> pd.DataFrame:
    from raybias.data.schema import SchemaError

    part = out[out["split"] == split].set_index("id")
    missing = ~meta["id"].isin(part.index)
    if missing.any():
        raise SchemaError(f"{DDB_AMPLIFIER_OUTPUTS}: no amplifier output for {int(missing.sum())} {split} "
                          f"example(s) (e.g. {meta['id'][missing].iloc[0]!r}) needed by {what}; rerun `raybias ddb`")
    return part.loc[meta["id"].tolist()]


class DDBRecipe(Recipe):
    """Shared: amplifier outputs on train (and val, for bias-label-free selection)."""

    def prepare(self, cfg, run, sets, seed):
        from raybias.classify.data import DataSet

        out = read_outputs(run)
        train = _aligned(sets["train"].meta, out, "train", self.name)
        y = sets["train"].meta["y"].to_numpy(np.int64)
        state: Dict[str, Any] = {
            "pseudo_groups": [int(g) for g in pseudo_groups(y, train["pred"].to_numpy())],
            "amp_ce": [float(v) for v in train["ce"].to_numpy()],
            "lff_ema": float(cfg.ddb.lff_ema),
            "lff_min_weight": float(cfg.ddb.lff_min_weight),
        }
        if not bool(cfg.train.ddb_select_with_bias_labels):
            val_meta = sets["val"].meta.copy()
            val = _aligned(val_meta, out, "val", self.name)
            val_meta["group"] = pseudo_groups(val_meta["y"].to_numpy(np.int64), val["pred"].to_numpy())
            val_meta["a"] = -1  # the true attribute is not used for selection
            sets["val"] = DataSet(val_meta, sets["val"].files, sets["val"].split)
        return state

    def train_groups(self, phase, ctx):
        return np.asarray(ctx.method_state["pseudo_groups"], dtype=np.int64)


class Recipe1(DDBRecipe, GroupDRORecipe):
    """Two-step: Group-DRO (its sampler and loss, unchanged) on the amplifier's pseudo groups,
    which DDBRecipe.train_groups puts where Group-DRO reads the true ones."""


class LfFWeightedCE(LossHook):
    """mean_i W_i · CE_D,i with W = L_B / (L_B + L_D), LfF-style (see the module docstring).

    L_D is the moving average of the debiased model's CE, updated with each batch exactly as
    LfF's `EMA` (util.py):
        ema ← α·ema + (1 − α·visited)·ce,  visited ← 1,
    so a row's first visit stores its CE whole and later visits average. L_B is LfF's same
    EMA of the biased model's loss, here the fixed amplifier's CE: a constant, so it is that
    CE once the row has been visited and 0 before. Both are divided by their class maximum
    over all rows (unvisited rows count 0, as in LfF, so in the first epoch the maxima are
    over the rows seen so far). The EMA and the visited mask are checkpointed with the loop's
    state, so a resumed run continues exactly. One worker only (refused under DDP:
    raybias.config.check_recipe2_workers).
    """

    def __init__(self, amp_ce: np.ndarray, y: np.ndarray, n_classes: int, ema: float,
                 min_weight: float = 0.0):
        self.min_weight = float(min_weight)
        self.amp_ce = torch.as_tensor(amp_ce, dtype=torch.float32)
        self.y = torch.as_tensor(y, dtype=torch.int64)
        self.n_classes = int(n_classes)
        self.ema = float(ema)
        self.ema_d = torch.zeros(len(self.amp_ce), dtype=torch.float32)
        self.visited = torch.zeros(len(self.amp_ce), dtype=torch.float32)  # LfF's `updated`
        self.last_mean_w = float("nan")

    def update(self, rows: torch.Tensor, ce: torch.Tensor) -> None:
        """LfF's EMA.update: the first visit of a row stores `ce` whole."""
        self.ema_d[rows] = self.ema * self.ema_d[rows] + (1 - self.ema * self.visited[rows]) * ce
        self.visited[rows] = 1.0

    def weights(self, rows: torch.Tensor) -> torch.Tensor:
        """W of `rows` from the current EMAs (after `update`), floored at min_weight."""
        y = self.y[rows]
        ema_b = self.amp_ce * self.visited  # LfF's EMA of a constant loss
        max_b = torch.zeros(self.n_classes).scatter_reduce(0, self.y, ema_b, "amax", include_self=True)
        max_d = torch.zeros(self.n_classes).scatter_reduce(0, self.y, self.ema_d, "amax", include_self=True)
        lb = ema_b[rows] / max_b[y].clamp_min(1e-8)
        ld = self.ema_d[rows] / max_d[y].clamp_min(1e-8)
        return (lb / (lb + ld + 1e-8)).clamp_min(self.min_weight)

    def __call__(self, inp: LossInput) -> torch.Tensor:
        if inp.world_size > 1:  # config validation refuses it; never train on partial EMAs
            from raybias.config import check_recipe2_workers

            check_recipe2_workers(inp.world_size)
        ce = inp.per_sample_ce()
        rows = torch.as_tensor(inp.rows, dtype=torch.int64)
        self.update(rows, ce.detach().float().cpu())
        w = self.weights(rows).to(ce.device)
        self.last_mean_w = float(w.mean())
        return (w * ce).mean()

    def state_dict(self):
        return {"ema_d": self.ema_d.clone(), "visited": self.visited.clone()}

    def load_state_dict(self, state):
        if "ema_d" in state:
            self.ema_d = state["ema_d"].clone().float()
            # a checkpoint from before the mask: rows with a non-zero EMA had been visited
            self.visited = state["visited"].clone().float() if "visited" in state \
                else (self.ema_d != 0).float()

    def log(self):
        return {"lff_mean_weight": round(self.last_mean_w, 4)}


class Recipe2(DDBRecipe):
    """End-to-end: LfF reweighting of the real training loss with the amplifier as biased model."""

    def loss_hook(self, phase, ctx):
        y = ctx.sets[phase.data].meta["y"].to_numpy(np.int64)
        return LfFWeightedCE(np.asarray(ctx.method_state["amp_ce"]), y, ctx.job.n_classes,
                             ctx.method_state["lff_ema"], ctx.method_state.get("lff_min_weight", 0.0))


# --- the amplifier's outputs on the real images (a Ray task, not the driver) ---------------

def _outputs_task(run_spec: str, model_bytes_: bytes, sets: Dict[str, Any], image_size: int,
                  threads: int) -> pd.DataFrame:
    from raybias.classify.data import load_images
    from raybias.classify.models import load_classifier
    from raybias.rundir import RunDir

    torch.set_num_threads(max(1, threads))
    run = RunDir(run_spec)
    model = load_classifier(model_bytes_)
    model.eval()
    cache: Dict[str, Any] = {}
    parts = []
    for split, ds in sets.items():
        images = load_images(run, ds, image_size, cache)
        y = torch.from_numpy(ds.meta["y"].to_numpy(np.int64, copy=True))  # writable: Arrow's is not
        preds, ces = [], []
        with torch.no_grad():
            for i in range(0, len(images), 512):
                logits = model(images[i:i + 512].float() / 255.0)
                preds.append(logits.argmax(1))
                ces.append(F.cross_entropy(logits, y[i:i + 512], reduction="none"))
        parts.append(pd.DataFrame({"id": ds.meta["id"].to_numpy(), "split": split, "y": y.numpy(),
                                   "pred": torch.cat(preds).numpy() if preds else np.zeros(0, np.int64),
                                   "ce": torch.cat(ces).numpy() if ces else np.zeros(0, np.float32)}))
    return pd.concat(parts, ignore_index=True)


def amplifier_outputs(run, model_bytes_: bytes, image_size: int, threads: int = 1) -> pd.DataFrame:
    """Predicted class and CE of the amplifier on every real train and val image (one Ray task).

    Only y is read from the metadata (the CE needs the class); the bias columns are dropped
    before the task sees them.
    """
    import ray

    from raybias.classify.data import DataSet, real_sets

    real = real_sets(run)
    sets = {s: DataSet(real[s].meta[["id", "y"]].copy(), real[s].files, real[s].split) for s in ("train", "val")}
    task = ray.remote(num_cpus=threads)(_outputs_task)
    return ray.get(task.remote(run.spec(), model_bytes_, sets, image_size, threads))


def conflict_scores(outputs: pd.DataFrame, meta: pd.DataFrame, info) -> Dict[str, Optional[float]]:
    """Precision / recall of the pseudo bias-conflicting set against the true one (evaluation only)."""
    m = meta[["id", "group"]].merge(outputs[outputs["split"] == "train"][["id", "y", "pred"]], on="id")
    true_conf = np.array([not info.is_aligned(int(g)) for g in m["group"]])
    pred_conf = (m["pred"].to_numpy() != m["y"].to_numpy())
    tp = int((true_conf & pred_conf).sum())

    def ratio(a: int, b: int) -> Optional[float]:
        return round(a / b, 4) if b else None

    return {"n_train": int(len(m)), "n_true_conflicting": int(true_conf.sum()),
            "n_pseudo_conflicting": int(pred_conf.sum()),
            "conflicting_precision": ratio(tp, int(pred_conf.sum())),
            "conflicting_recall": ratio(tp, int(true_conf.sum())),
            "aligned_precision": ratio(int((~true_conf & ~pred_conf).sum()), int((~pred_conf).sum())),
            "aligned_recall": ratio(int((~true_conf & ~pred_conf).sum()), int((~true_conf).sum()))}
