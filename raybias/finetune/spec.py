"""What a fine-tuning worker is given, typed and picklable, and the shape of a generator's models.

`finetune_spec(cfg, run, kind)` reads the config ONCE into a `FinetuneSpec`: every value a
worker uses, with no default of its own (config.py holds the defaults), the learning rate
already the one of the model kind's tuner, the base model resolved and the run directory
named. DDB's model trains with its own values: `dataclasses.replace` on the spec, field by
field. A `FinetuneJob` is one model (a group, or a (group, cluster), of one generator);
`WorkItem` pairs it with its spec and the test suite's armed fault; `TrainerWork` is what one
Ray Train trainer trains (one item, or a pack of them in turn).

`ModelEntry` is one model as `generators/<gen>/manifest.json` lists it: written by the
fine-tuning runner and by DDB, read by the generation plan (`read_generator_manifest`). Its
`bias` is the bias value it makes, None where it is unknown (DDB's class-only models); a
manifest of an earlier raybias has no `y`/`bias` and spells "unknown" as group -1: both read.

Everything here is light (no torch): the driver, the plan and the workers import it.
"""

from __future__ import annotations

import os
import random
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

# --------------------------------------------------------------------------- the job


@dataclass
class FinetuneJob:
    """One fine-tuning job: a group, or a (group, cluster), of one generator."""

    name: str  # "g1" or "g1-c2"
    generator: str
    kind: str  # "lora" | "dreambooth"
    group: Optional[int]  # None: no group (DDB's one class-conditional model)
    cluster: Optional[int]
    prompt_template: str  # "a sks red {member}"
    members: List[str]
    ids: List[str]  # ids of the real training images
    # prior preservation: prompt template of the class images (no identifier), else None
    class_template: Optional[str] = None
    # extra preview rows: models of other groups that borrow this job's weights
    borrower_previews: List[Dict[str, Any]] = field(default_factory=list)
    # per-image training prompts (same order as `ids`), overriding the template: Diffusing
    # DeBias trains one class-conditional model whose prompts name each image's class only
    prompts: Optional[List[str]] = None

    @property
    def key(self) -> str:
        """Unique across the generators trained together: "dreambooth/g1"."""
        return f"{self.generator}/{self.name}"


# --------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class FinetuneSpec:
    """How every job of one generator trains: the config's values, read once (no defaults here)."""

    run_spec: str  # RunDir(run_spec) in the worker
    base: str  # what load_pipeline takes
    revision: Optional[str]
    allow_pickle: bool
    base_folder: Optional[str]  # the base's local pipeline folder, if known (DreamBooth links it)
    steps: int
    batch_size: int
    lr: float  # the tuner's: finetune.lr (LoRA), finetune.dreambooth_lr (DreamBooth), ddb.lr (DDB)
    lora_rank: int
    lora_alpha: float
    prior_preservation: bool
    prior_loss_weight: float
    num_class_images: int
    checkpoint_every: int
    mixed_precision: str
    seed: int
    weight_decay: float
    max_grad_norm: float  # 0: no clipping
    sample_steps: int
    sample_guidance: float
    n_samples: int  # preview images per row
    progress_every: int
    cond_drop: float  # probability of an empty prompt per example (DDB's CFG training; else 0)


def base_model(cfg, run) -> Tuple[str, Optional[str]]:
    """(what load_pipeline takes, the local folder it is in if known)."""
    from raybias.diffusion.backbone import builtin_folder, is_pipeline_folder, resolve_base_model

    base = resolve_base_model(cfg, run)
    folder = builtin_folder() if base == "builtin" else os.path.expanduser(base)
    return base, folder if is_pipeline_folder(folder) else None


def finetune_spec(cfg, run, kind: str, base: Optional[Tuple[str, Optional[str]]] = None) -> FinetuneSpec:
    """The spec of every `kind` job (lora | dreambooth) of this config and run directory.

    `base`: (base, base_folder) as `base_model` gives them, when the caller has them already."""
    f = cfg.finetune
    name, folder = base if base is not None else base_model(cfg, run)
    return FinetuneSpec(
        run_spec=run.spec(), base=name, revision=cfg.base.revision, allow_pickle=bool(cfg.base.allow_pickle),
        base_folder=folder, steps=int(f.steps), batch_size=int(f.batch_size),
        lr=float(f.lr if kind == "lora" else f.dreambooth_lr), lora_rank=int(f.lora_rank),
        lora_alpha=float(f.lora_alpha), prior_preservation=bool(f.prior_preservation),
        prior_loss_weight=float(f.prior_loss_weight), num_class_images=int(f.num_class_images),
        checkpoint_every=int(f.checkpoint_every), mixed_precision=str(f.mixed_precision), seed=int(f.seed),
        weight_decay=float(f.weight_decay), max_grad_norm=float(f.max_grad_norm),
        sample_steps=int(f.sample_steps), sample_guidance=float(f.sample_guidance), n_samples=int(f.n_samples),
        progress_every=int(f.progress_every), cond_drop=0.0)


@dataclass
class WorkItem:
    """One job as a trainer's worker trains it: the job, its generator's spec, the armed fault."""

    job: FinetuneJob
    spec: FinetuneSpec
    fault: Optional[Dict[str, Any]] = None  # raybias.faults: None outside the test suite


@dataclass
class TrainerWork:
    """What one Ray Train trainer trains: one job, or a pack of jobs in turn."""

    items: List[WorkItem]
    use_gpu: bool
    threads: int  # torch threads of the worker
    launched_at: float  # the driver's fit(): the first job's start-up is counted from it
    board: Any = None  # the progress board actor, or None

    @property
    def packed(self) -> bool:
        return len(self.items) > 1


# --------------------------------------------------------------------------- prompts


def model_name(group: int, cluster: Optional[int] = None) -> str:
    return f"g{group}" if cluster is None else f"g{group}-c{cluster}"


class _MemberSlot(random.Random):
    """A member "draw" that returns the `{member}` placeholder itself."""

    def choice(self, seq):
        return "{member}"


def prompt_template(info, group: int, identifier: Optional[str] = None,
                    bias_override: Optional[str] = None) -> str:
    """The group's prompt with the bias word (and identifier) filled in and `{member}` left.

    Built by the project's prompt helper (`raybias.diffusion.prompts.group_prompt`), so the
    identifier lands where it puts it ("a sks red {member}"); training prompts are this
    template with a member filled in, and the generation stage fills it the same way.
    """
    from raybias.diffusion.prompts import group_prompt

    return group_prompt(info, group, _MemberSlot(), identifier=identifier, bias_override=bias_override)


def member_for(image_id: str, members: Sequence[str], seed: int) -> str:
    """The class member named in an image's prompt: drawn once per (image, seed), stable."""
    rng = np.random.default_rng([int(seed), zlib.crc32(str(image_id).encode())])
    return members[int(rng.integers(len(members)))]


def training_prompts(job: FinetuneJob, seed: int) -> List[str]:
    if job.prompts is not None:
        return list(job.prompts)
    return [job.prompt_template.format(member=member_for(i, job.members, seed)) for i in job.ids]


def preview_prompts(template: str, members: Sequence[str], n: int) -> List[str]:
    return [template.format(member=members[i % len(members)]) for i in range(n)]


# --------------------------------------------------------------------------- the manifest's models


# An earlier raybias wrote DDB's class-only models with this group for "bias unknown".
UNKNOWN_GROUP = -1


@dataclass
class ModelEntry:
    """One model of a generator, as generators/<gen>/manifest.json lists it."""

    name: str
    y: int  # the class it makes
    bias: Optional[int]  # the bias value it makes; None: unknown (DDB: prompts name the class only)
    group: Optional[int]  # the group of (y, bias); None when the bias is unknown
    kind: str  # raybias.registry.MODEL_KINDS
    folder: Optional[str]  # run-relative model folder; None for kind=base
    prompt_template: str  # with {member}
    members: List[str]
    cluster: Optional[int] = None
    weight: float = 1.0  # share of its group's images
    negative_prompt: Optional[str] = None
    n_images: Optional[int] = None  # real images it trained on
    group_images: Optional[int] = None  # real training images of its group
    borrowed_from: Optional[str] = None  # the trained model whose weights it uses
    steps: Optional[int] = None
    final_loss: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def bias_unknown(entry: Dict[str, Any]) -> bool:
    """Whether a manifest entry (its JSON) makes images of an unknown bias: `bias` null (this
    raybias), or group -1 (an earlier one's spelling)."""
    return entry.get("group") == UNKNOWN_GROUP or ("bias" in entry and entry["bias"] is None)
