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
- The plan is stored compactly: counts, models and a unit table (`runs`: one row per
  model's consecutive images — first image index, count, first unit number), never a row
  per image. `PlanUnits` derives any unit's range, and from it its ids, seeds and prompts,
  where they are needed (the sampler actor, the resume check), so the plan of ten million
  images is as small and as quick to build as that of ten.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence

from raybias.data.info import DatasetInfo
from raybias.data.io import TableMissing
from raybias.data.schema import SchemaError
from raybias.finetune.spec import ModelEntry, bias_unknown
from raybias.layout import generator_manifest, plan_path
from raybias.registry import GENERATORS, MODEL_KINDS
from raybias.rundir import RunDir

# 2: a unit table (one row per model's run of units) instead of every image's id, seed, prompt
PLAN_VERSION = 2


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


def id_stem(generator: str, group: int) -> str:
    return f"{generator}-g{group}-"


def image_id(generator: str, group: int, index: int) -> str:
    return f"{id_stem(generator, group)}{index:06d}"


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
        models.append(_model_spec(_model_entry(run, e, where, info), negative_prompts))
    return manifest, models


def _model_entry(run: RunDir, e: Dict[str, Any], where: str, info: DatasetInfo) -> ModelEntry:
    """One entry of a generator manifest, checked, as a `ModelEntry` (an earlier raybias's
    entry has no y and bias: they come from its group)."""
    name = _field(e, "name", where, str)
    if bias_unknown(e):
        raise SchemaError(f"{where}: model {name!r} makes images of an unknown bias (bias null, or group -1 as "
                          "an earlier raybias wrote it); a group-balanced set needs every model's group")
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
    return ModelEntry(
        name=name, y=y, bias=a, group=group, kind=kind, folder=folder, prompt_template=template,
        members=[str(m) for m in members], cluster=_field(e, "cluster", where, int, required=False), weight=weight,
        negative_prompt=_field(e, "negative_prompt", where, str, required=False),
        borrowed_from=_field(e, "borrowed_from", where, str, required=False))


def _model_spec(entry: ModelEntry, negative_prompts: bool) -> ModelSpec:
    """The plan's model for a manifest's entry (its negative prompt dropped without `negative_prompts`)."""
    return ModelSpec(name=entry.name, group=entry.group, kind=entry.kind, prompt_template=entry.prompt_template,
                     members=entry.members, weight=entry.weight, cluster=entry.cluster, folder=entry.folder,
                     negative_prompt=entry.negative_prompt if negative_prompts else None,
                     borrowed_from=entry.borrowed_from)


def models_for(run: RunDir, generator: str, info: DatasetInfo, negative_prompts: bool = True):
    """(base model from the generator manifest or None, models) for any generator."""
    if not GENERATORS[generator].finetuned:  # the base model as it is: nothing was trained
        return None, vanilla_models(info)
    manifest, models = read_generator_manifest(run, generator, info, negative_prompts)
    return manifest.get("base"), models


# --- the plan ----------------------------------------------------------------------------

def unit_run(model: ModelSpec, *, group: int, y: int, a: int, draw_group: int, id_stem: str, first_index: int,
             count: int, first_unit: int, unit_size: int) -> Dict[str, Any]:
    """One row of the plan's unit table: `count` images of one model, cut into units.

    Images `first_index .. first_index + count - 1` of the (generator, draw_group) sequence:
    image i has id `id_stem + f"{i:06d}"` and seed/member `image_draw(plan seed, generator,
    draw_group, i)`; units `first_unit ..` hold `unit_size` of them each (the last one the rest).
    """
    return {"model": model.name, "group": group, "y": y, "a": a, "cluster": model.cluster,
            "negative_prompt": model.negative_prompt, "draw_group": draw_group, "id_stem": id_stem,
            "first_index": first_index, "count": count, "first_unit": first_unit,
            "n_units": -(-count // unit_size)}


def build_plan(generator: str, info: DatasetInfo, models: List[ModelSpec], *, balance: str,
               per_group: int, unit_size: int, seed: int, sampling: Dict[str, Any],
               base_model: str, config_hash: str = "") -> Dict[str, Any]:
    """The whole plan as a JSON-able dict (see the module docstring): counts, models and the
    unit table (`runs`, one row per model), never a row per image."""
    real = {g: info.train_count(g) for g in range(info.n_groups)}
    targets = group_targets(balance, real, per_group)
    by_group: Dict[int, List[ModelSpec]] = {}
    for m in models:
        by_group.setdefault(m.group, []).append(m)
    runs: List[Dict[str, Any]] = []
    n_units = 0
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
            if count > 0:
                runs.append(unit_run(m, group=g, y=y, a=a, draw_group=g, id_stem=id_stem(generator, g),
                                     first_index=index, count=count, first_unit=n_units, unit_size=unit_size))
                n_units += runs[-1]["n_units"]
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
        "n_images": sum(r["count"] for r in runs),
        "n_units": n_units,
        "runs": runs,
    }


class PlanUnits:
    """The plan's work units, derived one at a time from its unit table (`plan["runs"]`).

    `unit(n)` is unit n's range (model, group, first image, count…); `expand(n)` adds its
    ids, seeds and prompts, computed by `image_draw` and `fill_template` exactly as the
    plan always made them. Only the unit table and the models are held, so this costs
    the same for ten images or ten million, on the driver and on each sampler actor.
    """

    def __init__(self, plan: Dict[str, Any]):
        self.generator = plan["generator"]
        self.seed = int(plan["seed"])
        self.unit_size = int(plan["unit_size"])
        self.models = plan["models"]
        self.runs = plan["runs"]
        self._starts = [int(r["first_unit"]) for r in self.runs]
        self.n_units = int(plan["n_units"])

    def __len__(self) -> int:
        return self.n_units

    def _run(self, n: int) -> Dict[str, Any]:
        if not 0 <= n < self.n_units:
            raise IndexError(f"unit {n} is not in the plan of {self.generator!r} (units 0..{self.n_units - 1})")
        return self.runs[bisect.bisect_right(self._starts, n) - 1]

    def unit(self, n: int) -> Dict[str, Any]:
        """Unit n's range: unit, model, group, y, a, cluster, negative_prompt, first image, count."""
        r = self._run(n)
        offset = (n - int(r["first_unit"])) * self.unit_size
        return {"unit": n, "model": r["model"], "group": r["group"], "y": r["y"], "a": r["a"],
                "cluster": r["cluster"], "negative_prompt": r["negative_prompt"],
                "first": int(r["first_index"]) + offset, "count": min(self.unit_size, int(r["count"]) - offset)}

    def count(self, n: int) -> int:
        return self.unit(n)["count"]

    def model_of(self, n: int) -> str:
        return self._run(n)["model"]

    def ids(self, n: int) -> List[str]:
        r, u = self._run(n), self.unit(n)
        return [f"{r['id_stem']}{i:06d}" for i in range(u["first"], u["first"] + u["count"])]

    def expand(self, n: int) -> Dict[str, Any]:
        """Unit n with its ids, seeds and prompts (what the sampler and the shard need)."""
        r, u = self._run(n), self.unit(n)
        model = self.models[r["model"]]
        members, template = model["members"], model["prompt_template"]
        seeds, prompts = [], []
        for i in range(u["first"], u["first"] + u["count"]):
            s, draw = image_draw(self.seed, self.generator, int(r["draw_group"]), i)
            seeds.append(s)
            prompts.append(fill_template(template, member=members[draw % len(members)]))
        unit = {k: u[k] for k in ("unit", "model", "group", "y", "a", "cluster", "negative_prompt")}
        return dict(unit, ids=self.ids(n), seeds=seeds, prompts=prompts)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return (self.unit(n) for n in range(self.n_units))


def _normal(value: Any) -> Any:
    """`value` as it reads back from plan.json (tuples as lists, keys as strings)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


SIGNATURE_KEYS = ("version", "generator", "base", "seed", "unit_size", "runs", "sampling", "models")
# Sampling settings that say how the work runs, not what it makes (generate.num_cpus and
# generate.model_cache, both config.EXECUTION_KEYS): a new value samples the remaining units
# with it and keeps the shards already written.
EXECUTION_SAMPLING = ("num_threads", "model_cache")


def plan_signature(plan: Dict[str, Any]) -> str:
    """What must not change for already-written shards to stay valid: the unit table with the
    seed, the unit size and the models' prompts is every unit's ids, seeds and prompts; the
    sampling settings but those that only say how it runs."""
    parts = {k: plan.get(k) for k in SIGNATURE_KEYS}
    if isinstance(parts["sampling"], dict):
        parts["sampling"] = {k: v for k, v in parts["sampling"].items() if k not in EXECUTION_SAMPLING}
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def same_plan(old: Optional[Dict[str, Any]], new: Dict[str, Any]) -> bool:
    """True when the shards made for plan `old` are exactly those plan `new` asks for.

    A plan saved by an earlier raybias (version 1: every unit's ids, seeds and prompts) is
    compared unit by unit with `new`'s derived units, so upgrading keeps a run's shards."""
    if old is None:
        return False
    if old.get("version") == PLAN_VERSION:
        return plan_signature(old) == plan_signature(new)
    if old.get("version") != 1 or not isinstance(old.get("units"), list):
        return False
    if any(_normal(old.get(k)) != _normal(new.get(k)) for k in ("generator", "base", "sampling", "models")):
        return False
    units = PlanUnits(new)
    return len(old["units"]) == len(units) and all(_normal(u) == units.expand(n) for n, u in enumerate(old["units"]))


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


def is_current(plan: Optional[Dict[str, Any]]) -> bool:
    """A plan in this version's form (a unit table), which `PlanUnits` reads."""
    return plan is not None and plan.get("version") == PLAN_VERSION and isinstance(plan.get("runs"), list)


def describe_plan(plan: Dict[str, Any], info: DatasetInfo) -> str:
    """Plain-text table: real images, images to generate, models, per group."""
    lines = [f"{'group':<28}{'real':>8}{'generate':>10}  models (images)"]
    for g in range(info.n_groups):
        models = [f"{name} ({plan['model_counts'][name]})" for name, m in plan["models"].items()
                  if m["group"] == g]
        lines.append(f"{f'{g} ' + info.group_name(g):<28}{plan['real_counts'][str(g)]:>8}"
                     f"{plan['group_counts'][str(g)]:>10}  {', '.join(models) or '-'}")
    lines.append(f"{plan['n_images']} images in {plan['n_units']} work units of up to {plan['unit_size']}")
    return "\n".join(lines)
