"""Data sources: each reads one on-disk format and returns rows of the raybias schema.

A source is a function `load(data_cfg) -> SourceData`, registered by name. It returns
every split as shipped (severity is applied afterwards by `raybias.data.severity`), with
images already resized to `data.image_size` and encoded as PNG.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import pandas as pd


class DataError(ValueError):
    """A dataset on disk is missing, malformed or unusable; the message names the file/field."""


@dataclass
class SourceData:
    table: pd.DataFrame
    n_classes: int
    n_bias: int
    class_names: List[str]
    bias_names: List[str]
    class_words: List[List[str]]  # members of each class, drawn from in prompts
    bias_words: List[str]
    prompt_template: str  # uses {member} and {bias}
    default_aligned: Optional[List[int]] = None  # aligned[y]; None: majority in train
    extra: Dict[str, object] = field(default_factory=dict)


_MODULES = {
    "colored_digits": "raybias.data.sources.colored_digits",
    "celeba": "raybias.data.sources.celeba",
    "waterbirds": "raybias.data.sources.waterbirds",
    "utkface": "raybias.data.sources.utkface",
    "csv": "raybias.data.sources.csv_source",
}


def get_source(name: str) -> Callable:
    if name not in _MODULES:
        raise DataError(f"unknown data.source {name!r}: allowed {', '.join(_MODULES)}")
    return importlib.import_module(_MODULES[name]).load


def load_source(data_cfg) -> SourceData:
    src = get_source(data_cfg.source)(data_cfg)
    if data_cfg.class_words is not None:
        src.class_words = [list(w) for w in data_cfg.class_words]
    if data_cfg.bias_words is not None:
        src.bias_words = list(data_cfg.bias_words)
    if data_cfg.prompt_template is not None:
        src.prompt_template = data_cfg.prompt_template
    if len(src.class_words) != src.n_classes:
        raise DataError(f"data.class_words has {len(src.class_words)} entries; the data has {src.n_classes} classes")
    if len(src.bias_words) != src.n_bias:
        raise DataError(f"data.bias_words has {len(src.bias_words)} entries; the data has {src.n_bias} bias values")
    if len(src.table) == 0:
        raise DataError(f"data.source={data_cfg.source} at {data_cfg.root}: the dataset is empty")
    return src
