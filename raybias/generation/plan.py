"""The generation plan: counts per group and cluster, prompts, seeds, work units.

Everything here is a pure function of the config, `data/info.json` and the generator's
manifest, so a resumed run rebuilds exactly the plan it started with (and checks it
against the saved `synthetic/<gen>/plan.json`).

- Per-group counts (`generate.balance`): `max_group` brings every group up to the largest
  (max − n_g), `per_group` makes `generate.per_group` each, `ffr` makes
  round(Σ_g (max − n_g) / #groups) each (From Fake to Real's amount).
- A group's images are split over its models (clusters, or one model per group) in
  proportion to the models' `weight`, by largest remainder so the counts add up exactly.
- Image i of group g gets a seed and a class member drawn from a hash of
  (generate.seed, generator, g, i): the same config always gives the same images, and a
  model split change does not reshuffle seeds.
- Units hold `generate.unit_size` images of ONE model, so an actor switches models at
  most once per unit.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from raybias.data.info import DatasetInfo
from raybias.data.io import TableMissing
from raybias.data.schema import SchemaError
from raybias.layout import generator_manifest, plan_path
from raybias.registry import MODEL_KINDS
from raybias.rundir import RunDir

PLAN_VERSION = 1


class _KeepUnknown(dict):
    def __missing__(self, key: str) -> str:  # leave placeholders we do not fill untouched
        return "{" + key + "}"


def fill_template(template: str, **values: str) -> str:
    """`template` with the named placeholders filled and any others left as they are."""
    return template.format_map(_KeepUnknown(values))


@dataclass
class ModelSpec:
    """One model that makes (part of) a group's images."""

    name: str
    group: int
    kind: str  # base (the base pipeline as is), lora, dreambooth
    prompt_template: str  # with {member}
    members: List[str]
    weight: float = 1.0
    cluster: Optional[int] = None
    folder: Optional[str] = None  # run-relative; None for kind=base
    negative_prompt: Optional[str] = None
    borrowed_from: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# --- counts ----------------------------------------------------------------------------

def group_targets(balance: str, real_counts: Dict[int, int], per_group: int) -> Dict[int, int]:
    """Images to generate per group under `balance` (max_group | per_group | ffr)."""
    if not real_counts:
        return {}
    top = max(real_counts.values())
    if balance == "max_group":
        return {g: top - n for g, n in real_counts.items()}
    if balance == "per_group":
        return {g: int(per_group) for g in real_counts}
    if balance == "ffr":
        missing = sum(top - n for n in real_counts.values())
        each = int(math.floor(missing / len(real_counts) + 0.5))
        return {g: each for g in real_counts}
    raise ValueError(f"unknown generate.balance {balance!r}")


def split_by_weight(n: int, weights: Sequence[float]) -> List[int]:
    """`n` split in proportion to `weights` (largest remainder; sums to n exactly)."""
    total = float(sum(weights))
    if not weights or total <= 0:
        raise ValueError("weights must be positive")
    exact = [n * w / total for w in weights]
    out = [int(math.floor(x)) for x in exact]
    rest = n - sum(out)
    # ties go to the earlier model, so the split is deterministic
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[:rest]:
        out[i] += 1
    return out


def image_draw(seed: int, generator: str, group: int, index: int) -> tuple[int, int]:
    """(sampling seed, member draw) for image `index` of `group`; 31-bit seeds work everywhere."""
    digest = hashlib.sha256(f"{seed}/{generator}/{group}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF, int.from_bytes(digest[4:8], "big")


def image_id(generator: str, group: int, index: int) -> str:
    return f"{generator}-g{group}-{index:06d}"


# --- models ----------------------------------------------------------------------------

def vanilla_models(info: DatasetInfo) -> List[ModelSpec]:
    """No fine-tuning: the base pipeline prompted with each group's class member and bias word."""
    models = []
    for g in range(info.n_groups):
        y, a = info.y_a(g)
        template = fill_template(info.prompt_template, bias=info.bias_words[a])
        models.append(ModelSpec(name=f"g{g}", group=g, kind="base", prompt_template=template,
                                members=list(info.class_words[y])))
    return models


def _field(entry: Dict[str, Any], key: str, where: str, types, required: bool = True):
    value = entry.get(key)
    if value is None:
        if required:
            raise SchemaError(f"{where}: model entry {entry.get('name', '?')!r} lacks field '{key}'")
        return None
    if isinstance(value, bool) or not isinstance(value, types):
        raise SchemaError(f"{where}: model {entry.get('name', '?')!r} field '{key}' has bad value {value!r}")
    return value


def read_generator_manifest(run: RunDir, generator: str, info: DatasetInfo,
                            negative_prompts: bool = True) -> tuple[Dict[str, Any], List[ModelSpec]]:
    """The models `raybias finetune` trained for `generator` (generators/<gen>/manifest.json).

    A borrowed model (cross-group generation for a group with too few real images) carries
    the manifest's negative prompt (the source group's bias word, set by `raybias finetune`);
    `negative_prompts=False` (generate.negative_prompt) drops them all.
    """
    rel = generator_manifest(generator)
    if not run.exists(rel):
        raise TableMissing(f"{run.path(rel)} does not exist (run `raybias finetune` for generator "
                           f"{generator!r} first)")
    try:
        manifest = run.read_json(rel)
    except ValueError as exc:
        raise SchemaError(f"{run.path(rel)} is not valid JSON: {exc}") from exc
    where = run.path(rel)
    entries = manifest.get("models") if isinstance(manifest, dict) else None
    if not isinstance(entries, list) or not entries:
        raise SchemaError(f"{where}: needs a non-empty list 'models'")
    models = []
    for e in entries:
        if not isinstance(e, dict):
            raise SchemaError(f"{where}: every entry of 'models' must be an object, not {e!r}")
        name = _field(e, "name", where, str)
        group = _field(e, "group", where, int)
        if not 0 <= group < info.n_groups:
            raise SchemaError(f"{where}: model {name!r} has group {group}; "
                              f"the data has groups 0..{info.n_groups - 1}")
        kind = _field(e, "kind", where, str)
        if kind not in MODEL_KINDS:
            raise SchemaError(f"{where}: model {name!r} has kind {kind!r}; allowed {', '.join(MODEL_KINDS)}")
        folder = _field(e, "folder", where, str, required=kind != "base")
        if folder is not None and not run.exists(folder):
            raise TableMissing(f"{where}: model {name!r} folder {run.path(folder)} does not exist")
        weight = float(_field(e, "weight", where, (int, float), required=False) or 1.0)
        if not weight > 0:
            raise SchemaError(f"{where}: model {name!r} has weight {weight}; it must be > 0")
        y, a = info.y_a(group)
        members = _field(e, "members", where, list, required=False) or list(info.class_words[y])
        template = _field(e, "prompt_template", where, str)
        negative = _field(e, "negative_prompt", where, str, required=False)
        borrowed = _field(e, "borrowed_from", where, str, required=False)
        cluster = _field(e, "cluster", where, int, required=False)
        models.append(ModelSpec(
            name=name, group=group, kind=kind, prompt_template=template, members=[str(m) for m in members],
            weight=weight, cluster=cluster, folder=folder,
            negative_prompt=negative if negative_prompts else None, borrowed_from=borrowed))
    return manifest, models


def models_for(run: RunDir, generator: str, info: DatasetInfo, negative_prompts: bool = True):
    """(base model from the generator manifest or None, models) for any generator."""
    if generator == "vanilla":
        return None, vanilla_models(info)
    manifest, models = read_generator_manifest(run, generator, info, negative_prompts)
    return manifest.get("base"), models


# --- the plan ----------------------------------------------------------------------------

@dataclass
class Unit:
    unit: int
    model: str
    group: int
    y: int
    a: int
    cluster: Optional[int]
    negative_prompt: Optional[str]
    ids: List[str] = field(default_factory=list)
    seeds: List[int] = field(default_factory=list)
    prompts: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def build_plan(generator: str, info: DatasetInfo, models: List[ModelSpec], *, balance: str,
               per_group: int, unit_size: int, seed: int, sampling: Dict[str, Any],
               base_model: str, config_hash: str = "") -> Dict[str, Any]:
    """The whole plan as a JSON-able dict (see the module docstring)."""
    real = {g: info.train_count(g) for g in range(info.n_groups)}
    targets = group_targets(balance, real, per_group)
    by_group: Dict[int, List[ModelSpec]] = {}
    for m in models:
        by_group.setdefault(m.group, []).append(m)
    units: List[Unit] = []
    model_counts: Dict[str, int] = {}
    cluster_counts: Dict[str, Dict[str, int]] = {}
    for g in range(info.n_groups):
        n = targets.get(g, 0)
        if n <= 0:
            continue
        group_models = sorted(by_group.get(g, []), key=lambda m: (-1 if m.cluster is None else m.cluster, m.name))
        if not group_models:
            raise SchemaError(
                f"generator {generator!r} has no model for group {g} ({info.group_name(g)}), which needs "
                f"{n} images; check {generator_manifest(generator)} (or re-run `raybias finetune`)")
        y, a = info.y_a(g)
        split = split_by_weight(n, [m.weight for m in group_models])
        index = 0
        for m, count in zip(group_models, split):
            model_counts[m.name] = count
            ckey = "all" if m.cluster is None else str(m.cluster)
            cluster_counts.setdefault(str(g), {})[ckey] = cluster_counts.get(str(g), {}).get(ckey, 0) + count
            for start in range(0, count, unit_size):
                u = Unit(unit=len(units), model=m.name, group=g, y=y, a=a, cluster=m.cluster,
                         negative_prompt=m.negative_prompt)
                for i in range(index + start, index + min(count, start + unit_size)):
                    s, draw = image_draw(seed, generator, g, i)
                    member = m.members[draw % len(m.members)]
                    u.ids.append(image_id(generator, g, i))
                    u.seeds.append(s)
                    u.prompts.append(fill_template(m.prompt_template, member=member))
                units.append(u)
            index += count
    return {
        "version": PLAN_VERSION,
        "generator": generator,
        "base": base_model,
        "config_hash": config_hash,
        "balance": balance,
        "seed": seed,
        "unit_size": unit_size,
        "real_counts": {str(g): n for g, n in real.items()},
        "group_counts": {str(g): targets.get(g, 0) for g in range(info.n_groups)},
        "cluster_counts": cluster_counts,
        "model_counts": model_counts,
        "models": {m.name: m.to_dict() for m in models if model_counts.get(m.name, 0) > 0},
        "sampling": dict(sampling),
        "n_images": sum(len(u.ids) for u in units),
        "units": [u.to_dict() for u in units],
    }


def plan_signature(plan: Dict[str, Any]) -> str:
    """What must not change for already-written shards to stay valid."""
    keys = ("generator", "base", "units", "sampling", "models")
    import json

    blob = json.dumps({k: plan.get(k) for k in keys}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_plan(run: RunDir, plan: Dict[str, Any]) -> None:
    run.write_json(plan_path(plan["generator"]), plan)


def load_plan(run: RunDir, generator: str) -> Optional[Dict[str, Any]]:
    rel = plan_path(generator)
    if not run.exists(rel):
        return None
    try:
        return run.read_json(rel)
    except ValueError:
        return None  # a plan that does not parse is rebuilt


def describe_plan(plan: Dict[str, Any], info: DatasetInfo) -> str:
    """Plain-text table: real images, images to generate, models, per group."""
    lines = [f"{'group':<28}{'real':>8}{'generate':>10}  models (images)"]
    for g in range(info.n_groups):
        models = [f"{name} ({plan['model_counts'][name]})" for name, m in plan["models"].items()
                  if m["group"] == g]
        lines.append(f"{f'{g} ' + info.group_name(g):<28}{plan['real_counts'][str(g)]:>8}"
                     f"{plan['group_counts'][str(g)]:>10}  {', '.join(models) or '-'}")
    lines.append(f"{plan['n_images']} images in {len(plan['units'])} work units of up to {plan['unit_size']}")
    return "\n".join(lines)
