"""What each entry of `methods:` means, and which config sections each stage depends on.

A method is either a classifier recipe run on the real data (erm, reweight, groupdro, jtt), a
generator whose synthetic set pretrains the classifier (the recipe registered for generators,
`two_stage`, with train.generator = that generator), or a Diffusing DeBias recipe, which reads
the `ddb` stage's set (raybias/registry.py registers each).
"""

from __future__ import annotations

from typing import List, Tuple

from raybias.registry import GENERATORS, RECIPES, pretraining_recipe

# Config sections whose values change what each stage produces (hashed in the manifest).
PREPARE = ("data",)
BASE = ("base",)
EMBED = PREPARE + ("embed",)
CLUSTER = EMBED + ("cluster",)


def generate_sections(generator: str) -> Tuple[str, ...]:
    return GENERATORS[generator].sections + ("generate",)


def filter_sections(generator: str) -> Tuple[str, ...]:
    return generate_sections(generator) + ("filter", "embed")


def diagnostics_sections(generator: str) -> Tuple[str, ...]:
    return filter_sections(generator) + ("diagnostics",)


def generator_of(method: str) -> str | None:
    """The generator whose synthetic data `method` trains on, if any."""
    if method in GENERATORS:
        return method
    recipe = RECIPES.get(method)
    return recipe.reads if recipe is not None else None


def train_method_of(method: str) -> str:
    return pretraining_recipe() if method in GENERATORS else method


def train_sections(method: str) -> Tuple[str, ...]:
    gen = generator_of(method)
    if gen == "ddb":
        return ("data", "base", "ddb", "generate", "train")
    if gen is not None:
        return filter_sections(gen) + ("train",)
    return ("data", "train")


def method_config(cfg, method: str):
    """A copy of `cfg` whose `train` section runs `method`."""
    new = cfg.copy()
    new.train.method = train_method_of(method)
    if method in GENERATORS:
        new.train.generator = method
    return new


def generators_needed(methods: List[str]) -> List[str]:
    out: List[str] = []
    for m in methods:
        g = generator_of(m)
        if g and g not in out:
            out.append(g)
    return out
