"""Recipes: the ways to train a classifier (`train.method`), as small hooks on the one loop
(raybias/classify/loop.py). A `methods:` entry is a method a run compares; it trains with a
recipe (erm with erm, a generator with two_stage on its synthetic set: raybias/methods.py).

A recipe is a registered `Recipe`: a list of phases (each a run of epochs on one data set
with its own learning rate) and hooks the loop calls:

- `prepare(cfg, run, sets, seed)`   driver side, before the trainer starts: may add data sets
                                    (two_stage adds "stage1") and returns `method_state`
                                    (picklable) that workers see as `ctx.method_state`;
- `train_groups(phase, ctx)`        the group label of every training row that samplers and
                                    group losses use (default: the true group; a recipe may
                                    replace them, e.g. with pseudo groups);
- `sample_weights(phase, ctx)`      None (a permutation each epoch), (per-row weights,
                                    epoch size) for sampling with replacement, or
                                    (data.Multiplicity(counts), counts.sum()) for an exact
                                    epoch holding row i counts[i] times (JTT);
- `loss_hook(phase, ctx)`           a `LossHook`: the batch loss from logits (per-sample
                                    losses, rows, groups, features available);
- `end_phase(phase, ctx)`           after a phase's last epoch (JTT builds its error set);
- `projection(t)`                   the SupCon projection head the model carries (two_stage);
- `result_info(t, candidates)`      extra metrics.json entries (two_stage: which stage 2).

Built in: erm, reweight (group-balanced sampling), groupdro (group-balanced sampling +
Group-DRO loss), jtt (ERM for jtt_epochs, then a model from scratch on the upweighted set:
each error row jtt_lambda times per epoch), two_stage (stage 1: beta CE + (1-beta) SupCon
on the synthetic set; stage 2 on the real set with stage2_method, head only or whole
network, or stage2=auto: every candidate from the one stage-1 model, the best on validation
kept).

Adding a recipe (e.g. Diffusing DeBias' recipes): subclass `Recipe` and register it once, by
name and "module:class", in raybias/registry.py (`RecipeKind`): the config then allows it and
workers import its module when they look it up (`get_method`, by the train.method name). Per-sample weights or losses go in a
`LossHook` (see `SampleWeightedCE`); replacement groups in `train_groups`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from raybias.classify.losses import GroupDRO, supcon_loss
from raybias.registry import RECIPES, load_code
from raybias.classify.metrics import selection_key
from raybias.classify.models import ProjectionSpec


@dataclass(frozen=True)
class Phase:
    name: str
    data: str  # which data set it trains on: "train" (real) or "stage1"
    epochs: int
    lr: float
    select: bool = False  # keep the epoch with the best validation WGA
    reinit: str = "none"  # at the start: "all" (a new model from the seed), "head", "none"
    freeze_encoder: bool = False  # train the head only (encoder weights and BN statistics fixed)
    optimizer: Optional[str] = None  # None: train.optimizer
    weight_decay: Optional[float] = None  # None: train.weight_decay
    # the model's weights at the phase's start: a model artifact an earlier phase made (the
    # stage-1 model, which every stage-2 candidate starts from); None: the current weights
    start_from: Optional[str] = None
    # the phase number the random draws (rows, augmentation, head init) derive from; None:
    # its own. Stage-2 candidates all draw as the one fixed stage 2 does.
    rng_phase: Optional[int] = None
    # a stage-2 candidate ("<head|full>+<loss>"): its best epoch's validation metrics are
    # recorded, and the candidate with the best is what the run keeps
    candidate: Optional[str] = None


@dataclass
class LossInput:
    logits: torch.Tensor
    y: torch.Tensor
    groups: torch.Tensor  # training groups (possibly replaced by the method)
    rows: torch.Tensor  # row indices into the phase's data set
    features: Optional[torch.Tensor] = None
    world_size: int = 1

    def per_sample_ce(self) -> torch.Tensor:
        return F.cross_entropy(self.logits, self.y, reduction="none")


class LossHook:
    """Turns a batch into the loss to minimise. State (if any) is checkpointed."""

    needs_features = False

    def __call__(self, inp: LossInput) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} must define __call__")

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    def log(self) -> Dict[str, Any]:
        return {}


class CrossEntropy(LossHook):
    def __call__(self, inp: LossInput) -> torch.Tensor:
        return F.cross_entropy(inp.logits, inp.y)


class SampleWeightedCE(LossHook):
    """mean_i w_i * CE_i with w = weight_fn(inp) (per-sample reweighting, e.g. LfF-style)."""

    def __init__(self, weight_fn: Callable[[LossInput], torch.Tensor]):
        self.weight_fn = weight_fn

    def __call__(self, inp: LossInput) -> torch.Tensor:
        w = self.weight_fn(inp).detach()
        return (w * inp.per_sample_ce()).mean()


class GroupDROLoss(LossHook):
    def __init__(self, n_groups: int, eta: float, c: float, train_counts):
        self.dro = GroupDRO(n_groups, eta, c, train_counts)

    def __call__(self, inp: LossInput) -> torch.Tensor:
        return self.dro.loss(inp.per_sample_ce(), inp.groups, inp.world_size)

    def state_dict(self):
        return self.dro.state_dict()

    def load_state_dict(self, state):
        self.dro.load_state_dict(state)

    def log(self):
        return {"groupdro_q": [round(float(v), 4) for v in self.dro.q]}


class CEPlusSupCon(LossHook):
    """beta * CE + (1 - beta) * SupCon (labels: the class) on what the model gives SupCon:
    the projection head's output, or the encoder's features without one."""

    needs_features = True

    def __init__(self, beta: float, temperature: float, base_temperature: Optional[float] = None,
                 anchors: str = "all"):
        self.beta = beta
        self.temperature = temperature
        self.base_temperature = base_temperature
        self.anchors = anchors

    def __call__(self, inp: LossInput) -> torch.Tensor:
        loss = self.beta * F.cross_entropy(inp.logits, inp.y)
        if self.beta < 1:
            loss = loss + (1 - self.beta) * supcon_loss(inp.features, inp.y, self.temperature,
                                                        self.base_temperature, self.anchors)
        return loss


class Recipe:
    """Base: ERM on the real training set, one phase, model selection by val WGA."""

    name = "erm"

    def phases(self, t) -> List[Phase]:
        return [Phase("main", "train", int(t.epochs), float(t.lr), select=True)]

    def prepare(self, cfg, run, sets: Dict[str, Any], seed: int) -> Dict[str, Any]:
        return {}

    def train_groups(self, phase: Phase, ctx) -> np.ndarray:
        return ctx.sets[phase.data].meta["group"].to_numpy(np.int64)

    def sample_weights(self, phase: Phase, ctx) -> Optional[Tuple[np.ndarray, int]]:
        return None

    def loss_hook(self, phase: Phase, ctx) -> LossHook:
        return CrossEntropy()

    def end_phase(self, phase: Phase, ctx) -> None:
        pass

    def projection(self, t) -> Optional[ProjectionSpec]:
        """The SupCon projection head the model carries (None: none)."""
        return None

    def result_info(self, t, candidates: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
        """Extra entries of metrics.json, from the config and the candidates' records."""
        return {}


def choose_stage2(candidates: Dict[str, Dict[str, Any]], order: List[str], rank: str = "final") -> str:
    """The candidate to keep: the best validation metrics by `selection_key` (WGA, then AGA),
    ties going to the earliest in `order`. `candidates`: name -> {"val": metrics at its best
    epoch, "final": at its last epoch, ...}; `rank` (train.stage2_rank) says which of the two
    ranks them. The loop keeps the chosen candidate's best epoch."""
    names = [c for c in order if c in candidates]
    if not names:
        raise ValueError("no stage-2 candidate has finished an epoch")
    field_ = "final" if rank == "final" else "val"
    best = names[0]
    for c in names[1:]:
        if selection_key(candidates[c][field_]) > selection_key(candidates[best][field_]):
            best = c
    return best


def group_balanced_weights(groups: np.ndarray) -> Tuple[np.ndarray, int]:
    """Weight 1/n_g per example (every group equally likely); epoch size = the set's size."""
    counts = np.bincount(groups)
    return 1.0 / counts[groups], len(groups)


def get_method(name: str) -> Recipe:
    """The hooks of the recipe registered as `name` (its module imported on first use, so
    Ray workers find it too)."""
    if name not in RECIPES:
        from raybias.config import ConfigError

        raise ConfigError(f"train.method {name!r} has no registered training hook; known: "
                          + ", ".join(registered()))
    method = load_code(RECIPES[name].code)()
    method.name = name
    return method


def registered() -> List[str]:
    return sorted(RECIPES)


def epochs_reported(t) -> int:
    """Epochs (Ray Train reports) a classifier of train section `t` makes, over all its phases."""
    return sum(int(p.epochs) for p in get_method(t.method).phases(t))


class Reweight(Recipe):
    def sample_weights(self, phase, ctx):
        return group_balanced_weights(ctx.train_groups)


class GroupDRORecipe(Recipe):
    """Group-DRO with group-balanced sampling, as the reference implementation runs it."""

    def sample_weights(self, phase, ctx):
        return group_balanced_weights(ctx.train_groups)

    def loss_hook(self, phase, ctx):
        t = ctx.train
        return GroupDROLoss(ctx.n_train_groups, t.groupdro_eta, t.groupdro_c,
                            np.bincount(ctx.train_groups, minlength=ctx.n_train_groups))


class JTT(Recipe):
    """Just Train Twice (Liu et al.): ERM for jtt_epochs (T); the misclassified training
    examples (error set) are then upweighted by jtt_lambda (λ) while a new model trains from
    scratch. train.jtt_draw=exact (default): each epoch is the upweighted set itself, every
    error row exactly λ times and every other row once, shuffled (the JTT paper's construction,
    as BalancingGroups runs it); =replacement: as many draws with replacement, error rows λ
    times as likely. Both phases use train.jtt_optimizer / jtt_lr / jtt_weight_decay where set
    (the JTT paper's SGD values in the real-data configs)."""

    def phases(self, t):
        lr = float(t.jtt_lr if t.get("jtt_lr") is not None else t.lr)
        opt, wd = t.get("jtt_optimizer"), t.get("jtt_weight_decay")
        wd = None if wd is None else float(wd)
        return [Phase("identify", "train", int(t.jtt_epochs), lr, optimizer=opt, weight_decay=wd),
                Phase("final", "train", int(t.epochs), lr, select=True, reinit="all",
                      optimizer=opt, weight_decay=wd)]

    def end_phase(self, phase, ctx):
        if phase.name != "identify":
            return
        pred = ctx.predict("train")
        y = ctx.sets["train"].meta["y"].to_numpy(np.int64)
        errors = np.flatnonzero(pred != y)
        ctx.method_state["error_rows"] = [int(r) for r in errors]
        ids = ctx.sets["train"].meta["id"].iloc[errors].tolist()
        ctx.add_artifact("jtt_error_set.json", {"ids": ids, "n": len(ids), "n_train": int(len(y)),
                                                "lambda": float(ctx.train.jtt_lambda),
                                                "draw": str(ctx.train.get("jtt_draw", "exact"))})
        ctx.add_model_artifact("jtt_identifier.safetensors")

    def sample_weights(self, phase, ctx):
        if phase.name != "final":
            return None
        errors = np.asarray(ctx.method_state.get("error_rows", []), dtype=np.int64)
        lam = float(ctx.train.jtt_lambda)
        if str(ctx.train.get("jtt_draw", "exact")) == "exact":
            from raybias.classify.data import Multiplicity

            counts = np.ones(len(ctx.sets["train"]), dtype=np.int64)
            counts[errors] = int(lam)  # integer: checked by config validation
            return Multiplicity(counts), int(counts.sum())
        w = np.ones(len(ctx.sets["train"]), dtype=np.float64)
        w[errors] = lam
        return w, int(round(w.sum()))  # as many draws as the upweighted set has rows


STAGE2_RECIPES = {"erm": Recipe, "reweight": Reweight, "groupdro": GroupDRORecipe}
STAGE1_MODEL = "stage1_model.safetensors"  # the stage-1 model, in the classifier's folder


def stage2_candidates(t) -> List[str]:
    """What stage 2 trains: every train.stage2_candidates entry for auto, else the one choice."""
    if t.stage2 == "auto":
        return [str(c) for c in t.stage2_candidates]
    return [f"{t.stage2}+{t.stage2_method}"]


class TwoStage(Recipe):
    """Stage 1 on the synthetic set (+ synthetic_ratio real), beta CE + (1-beta) SupCon
    (through the projection head train.stage1.projection); stage 2 on the real biased set
    with stage2_method, head only (Basu et al.) or full (FFR) — or, with stage2=auto, one
    phase per candidate, each starting from the stage-1 model, the best on validation kept."""

    def phases(self, t):
        s1 = Phase("stage1", "stage1", int(t.stage1.epochs), float(t.stage1.lr))
        if t.stage2 != "auto":
            head = t.stage2 == "head"
            return [s1, Phase("stage2", "train", int(t.epochs), float(t.lr), select=True,
                              reinit="head" if head else "none", freeze_encoder=head,
                              candidate=stage2_candidates(t)[0])]
        out = [s1]
        for c in stage2_candidates(t):
            head = c.split("+")[0] == "head"
            # rng_phase 1: each candidate draws as the fixed stage 2 (phase 1) would, so the
            # candidate "head+groupdro" trains exactly what stage2=head, stage2_method=groupdro does
            out.append(Phase(f"stage2:{c}", "train", int(t.epochs), float(t.lr), select=True,
                             reinit="head" if head else "none", freeze_encoder=head, start_from=STAGE1_MODEL,
                             rng_phase=1, candidate=c))
        return out

    def projection(self, t):
        s1 = t.stage1
        if s1.projection == "none" or float(s1.beta) >= 1:  # no SupCon term: nothing reads a head
            return None
        hidden = s1.get("projection_hidden")
        return ProjectionSpec(str(s1.projection), int(s1.projection_dim), int(hidden) if hidden else None)

    def prepare(self, cfg, run, sets, seed):
        from raybias.classify.data import mix_real_into, synthetic_set

        t = cfg.train
        syn = synthetic_set(run, t.generator) if t.synthetic_ratio < 1 else None
        if syn is None:
            from raybias.classify.data import DataSet

            syn = DataSet(sets["train"].meta.iloc[:0], [], None)
        sets["stage1"] = mix_real_into(syn, sets["train"], float(t.synthetic_ratio), seed)
        return {}

    def end_phase(self, phase, ctx):
        if phase.name == "stage1":  # the pretrained encoder: every stage-2 candidate starts from it
            ctx.add_model_artifact(STAGE1_MODEL)

    def _stage2(self, phase) -> Recipe:
        return STAGE2_RECIPES[phase.candidate.split("+")[1]]()

    def sample_weights(self, phase, ctx):
        return None if phase.name == "stage1" else self._stage2(phase).sample_weights(phase, ctx)

    def loss_hook(self, phase, ctx):
        if phase.name == "stage1":
            s1 = ctx.train.stage1
            base = s1.get("base_temperature")
            return CEPlusSupCon(float(s1.beta), float(s1.temperature), None if base is None else float(base),
                                str(s1.get("supcon_anchors", "all")))
        return self._stage2(phase).loss_hook(phase, ctx)

    def result_info(self, t, candidates):
        """metrics.json's "stage2": the mode, the candidate kept and, for auto, what ranked
        them and every candidate's validation metrics at its best and at its last epoch (its
        test metrics, at its best epoch, beside them are for reading only: the choice never
        sees them)."""
        order = stage2_candidates(t)
        rank = str(t.get("stage2_rank", "final"))
        info: Dict[str, Any] = {"mode": str(t.stage2), "order": order,
                                "chosen": choose_stage2(candidates, order, rank) if candidates else order[0]}
        if t.stage2 == "auto":
            info["rank"] = rank
            info["candidates"] = {c: {"val_wga": r["val"]["wga"], "val_aga": r["val"]["aga"],
                                      "best_epoch": r["epoch"],
                                      "final_val_wga": r["final"]["wga"], "final_val_aga": r["final"]["aga"],
                                      "test_wga": (r.get("test") or {}).get("wga"),
                                      "test_aga": (r.get("test") or {}).get("aga")}
                                  for c, r in candidates.items()}
        return {"stage2": info}
