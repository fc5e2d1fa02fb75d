"""Every name a config may give that stands for code, registered once.

- data sources (`data.source`),
- embedders (`embed.embedder`, `filter.embedder`),
- generators (`methods:` entries that make a synthetic set, `train.generator`): a
  `GeneratorKind` each, the facts the stages ask of it,
- classifier recipes (`train.method`): a `RecipeKind` each, and with the generators they make
  the `methods:` entries a run may compare (`method_names`).

Code is named by "module:attribute" and imported where it runs, so this module imports
nothing of raybias and no heavy library: the config validates names against it at load, and
every layer above looks things up here instead of keeping its own list.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple


def load_code(ref: str) -> Any:
    """The object a "module:attribute" reference names."""
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


# --------------------------------------------------------------------------- data sources


@dataclass(frozen=True)
class SourceKind:
    name: str
    load: str  # "module:function", load(data_cfg) -> SourceData
    reads_files: bool = True  # it reads its images from data.root


SOURCES: Dict[str, SourceKind] = {s.name: s for s in (
    SourceKind("colored_digits", "raybias.data.sources.colored_digits:load", reads_files=False),
    SourceKind("celeba", "raybias.data.sources.celeba:load"),
    SourceKind("waterbirds", "raybias.data.sources.waterbirds:load"),
    SourceKind("utkface", "raybias.data.sources.utkface:load"),
    SourceKind("csv", "raybias.data.sources.csv_source:load"),
)}

# --------------------------------------------------------------------------- embedders

# name -> "module:factory", factory(options: dict, device=...) -> Embedder (raybias.embed)
EMBEDDERS: Dict[str, Any] = {
    "builtin": "raybias.embed.builtin:BuiltinEmbedder",
    "clip": "raybias.embed.clip:ClipEmbedder",
}

# --------------------------------------------------------------------------- generators

# The kinds of model a generator's manifest entry may hold (generators/<gen>/manifest.json):
# the base pipeline as it is, a LoRA adapter, or a DreamBooth UNet.
MODEL_KINDS = ("base", "lora", "dreambooth")


@dataclass(frozen=True)
class GeneratorKind:
    """A text-to-image generator of group-balanced synthetic data (a `methods:` entry)."""

    name: str
    model: str  # the kind of its models (MODEL_KINDS); "base": nothing is fine-tuned
    clusters: bool = False  # one model per (group, cluster) of the image embeddings
    identifier: bool = False  # its training prompts carry finetune.identifier (DreamBooth's token)

    @property
    def finetuned(self) -> bool:
        return self.model != "base"

    @property
    def sections(self) -> Tuple[str, ...]:
        """The config sections its models depend on (the hash of `finetune/<name>`; generate
        and filter add theirs)."""
        return ("data", "base", "finetune") + (("embed", "cluster") if self.clusters else ())


GENERATORS: Dict[str, GeneratorKind] = {}


def register_generator(kind: GeneratorKind) -> GeneratorKind:
    return _register(GENERATORS, kind, "model", MODEL_KINDS)


def finetuned_generators() -> List[str]:
    return [g.name for g in GENERATORS.values() if g.finetuned]


# --------------------------------------------------------------------------- classifier recipes


@dataclass(frozen=True)
class RecipeKind:
    """A way to train the classifier (`train.method`): phases and hooks on the one loop."""

    name: str
    code: str  # "module:class" of its hooks (raybias/classify)
    # How `methods:` names it: "self" (its own name), "generators" (each generator's name:
    # the recipe pretrains on that generator's synthetic set), "" (no entry of its own)
    entry: str = "self"
    # The generator-like stage whose data it reads besides the real set (DDB's recipes: "ddb")
    reads: Optional[str] = None
    selectable: bool = True  # a value of train.method (False: used inside a stage only)


RECIPES: Dict[str, RecipeKind] = {}
RECIPE_ENTRIES = ("self", "generators", "")


def register_recipe(kind: RecipeKind) -> RecipeKind:
    return _register(RECIPES, kind, "entry", RECIPE_ENTRIES)


def recipe_names() -> List[str]:
    """The values train.method allows."""
    return [r.name for r in RECIPES.values() if r.selectable]


def method_names() -> List[str]:
    """The entries `methods:` allows, in registration order (a generator stands where the
    recipe that pretrains on it is registered)."""
    out: List[str] = []
    for r in RECIPES.values():
        out += [r.name] if r.entry == "self" else list(GENERATORS) if r.entry == "generators" else []
    return out


def pretraining_recipe() -> str:
    """The recipe a generator's `methods:` entry trains with."""
    return next(r.name for r in RECIPES.values() if r.entry == "generators")


def _register(table: Dict[str, Any], kind: Any, field: str, allowed: Tuple[str, ...]) -> Any:
    """Add `kind` to `table`: its `field` must be one of `allowed`, and its name new among the
    generators and the recipes (both are spelled in `methods:`)."""
    if getattr(kind, field) not in allowed:
        raise ValueError(f"{kind.name!r}: {field} {getattr(kind, field)!r} is not one of "
                         + ", ".join(map(repr, allowed)))
    if kind.name in GENERATORS or kind.name in RECIPES:
        raise ValueError(f"{kind.name!r} is registered already")
    table[kind.name] = kind
    return kind


# --------------------------------------------------------------------------- the registrations

for _kind in (
    GeneratorKind("vanilla", model="base"),
    GeneratorKind("lora", model="lora"),
    GeneratorKind("dreambooth", model="dreambooth", identifier=True),
    GeneratorKind("clustered_dreambooth", model="dreambooth", clusters=True, identifier=True),
):
    register_generator(_kind)

for _recipe in (
    RecipeKind("erm", "raybias.classify.recipes:Recipe"),
    RecipeKind("reweight", "raybias.classify.recipes:Reweight"),
    RecipeKind("groupdro", "raybias.classify.recipes:GroupDRORecipe"),
    RecipeKind("jtt", "raybias.classify.recipes:JTT"),
    RecipeKind("two_stage", "raybias.classify.recipes:TwoStage", entry="generators"),
    RecipeKind("ddb_recipe1", "raybias.classify.ddb:Recipe1", reads="ddb"),
    RecipeKind("ddb_recipe2", "raybias.classify.ddb:Recipe2", reads="ddb"),
    RecipeKind("ddb_amplifier", "raybias.classify.ddb:Amplifier", entry="", reads="ddb", selectable=False),
):
    register_recipe(_recipe)
