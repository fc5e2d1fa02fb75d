"""Each name once, one stage table, imports that only run down: the registry is what the config
allows and what the code loads, every stage has the one entry signature, and no module of
the package imports one that imports it back."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from raybias.config import ConfigError, load_config
from raybias.registry import (EMBEDDERS, GENERATORS, MODEL_KINDS, RECIPES, SOURCES, load_code, method_names,
                              recipe_names)
from raybias.stages import STAGES, plan_stages

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def test_the_config_allows_exactly_what_is_registered():
    for m in method_names():
        assert list(load_config(QUICKSTART, [f"methods=[{m}]"]).methods) == [m]
    for r in recipe_names():
        assert load_config(QUICKSTART, [f"train.method={r}"]).train.method == r
    for g in GENERATORS:
        assert load_config(QUICKSTART, [f"train.generator={g}"]).train.generator == g
    # a generator stands where the recipe that pretrains on it is registered
    assert method_names() == ["erm", "reweight", "groupdro", "jtt", "vanilla", "lora", "dreambooth",
                              "clustered_dreambooth", "ddb_recipe1", "ddb_recipe2"]
    with pytest.raises(ConfigError, match="one of " + ", ".join(method_names())):
        load_config(QUICKSTART, ["methods=[two_stage]"])  # a recipe, not an entry of methods:
    with pytest.raises(ConfigError, match="one of " + ", ".join(recipe_names())):
        load_config(QUICKSTART, ["train.method=ddb_amplifier"])  # used inside the ddb stage only
    with pytest.raises(ConfigError, match="one of " + ", ".join(SOURCES)):
        load_config(QUICKSTART, ["data.source=mnist"])


def test_every_registered_name_loads_its_code():
    from raybias.classify.recipes import Recipe, get_method

    for name, recipe in RECIPES.items():
        hooks = get_method(name)
        assert isinstance(hooks, Recipe) and hooks.name == name and type(hooks) is load_code(recipe.code)
    for source in SOURCES.values():
        assert callable(load_code(source.load))
    for name, factory in EMBEDDERS.items():
        assert callable(load_code(factory)), name
    for g in GENERATORS.values():
        assert g.model in MODEL_KINDS
        assert g.finetuned == (g.model != "base")
        assert g.sections[:3] == ("data", "base", "finetune")
        assert ("cluster" in g.sections) == g.clusters


def test_every_stage_has_the_one_entry_signature():
    from raybias.stages.preflight import STAGE_CHECKS

    for stage in STAGES.values():
        for fn in (stage.command(), stage.pipeline_step()):
            params = list(inspect.signature(fn).parameters.values())
            assert [p.name for p in params] == ["cfg", "run", "mode", "verbose"], (stage.name, fn.__name__)
            assert params[3].default is True
    # every stage a chain runs has its preflight check, and no check names a stage not in the table
    assert set(STAGE_CHECKS) == {name for name, s in STAGES.items() if not s.chain}


def test_plan_stages_follows_the_registered_generators():
    base = ["data.source=colored_digits"]
    assert plan_stages(load_config(QUICKSTART, base + ["methods=[erm]"])) == ["prepare", "train", "report"]
    assert plan_stages(load_config(QUICKSTART, base + ["methods=[vanilla]", "filter.enabled=false"])) == \
        ["prepare", "generate", "filter", "train", "report"]
    assert plan_stages(load_config(QUICKSTART, base + ["methods=[lora]"])) == \
        ["prepare", "embed", "finetune", "generate", "filter", "train", "report"]
    assert plan_stages(load_config(QUICKSTART, base + ["methods=[clustered_dreambooth,ddb_recipe1]"])) == \
        ["prepare", "embed", "cluster", "finetune", "generate", "filter", "ddb", "train", "report"]


def _imports(path: Path, module: str) -> set:
    """The raybias modules `module` imports anywhere in its file (lazy imports too)."""
    package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: len(module.split(".")) - (0 if package else 1) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out.update(n for n in names if n == "raybias" or n.startswith("raybias."))
    return out


def test_no_module_of_the_package_imports_one_that_imports_it_back():
    files = {}
    for path in (ROOT / "raybias").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        files[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in files.items():
        found = set()
        for target in _imports(path, name):
            while target and target not in files:  # `from raybias.x import f`: the module raybias.x
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
        graph[name] = found

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    circles = [c for c in map(cycle_from, sorted(graph)) if c]
    assert not circles, " ; ".join(" -> ".join(c) for c in circles)
    # the top: only the command line, the submissions and the stages themselves import a stage
    # (the layers below them — data, embed, clustering, diffusion, generation, classify, the run
    # directory — never reach back up into a stage's module)
    top = {"raybias.cli", "raybias.submit", "raybias.__main__"}
    upward = sorted(f"{name} -> {t}" for name, targets in graph.items() for t in targets
                    if t.startswith("raybias.stages") and not name.startswith("raybias.stages") and name not in top)
    assert not upward, upward
    # the bottom: what the config validates against imports nothing of raybias
    for name in ("raybias.registry", "raybias.palette", "raybias.layout"):
        assert graph[name] == set(), (name, graph[name])
    assert graph["raybias.config"] == {"raybias.registry", "raybias.palette"}
