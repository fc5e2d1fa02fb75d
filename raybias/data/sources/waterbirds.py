"""waterbirds: the Waterbirds dataset (Sagawa et al.) as distributed.

On disk (under data.root): `metadata.csv` with columns `img_id, img_filename, y, split,
place, place_filename` (split 0/1/2 = train/val/test; y 0 landbird / 1 waterbird; place
0 land / 1 water) and the images at `img_filename`, e.g.
`001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg`.

Target y = bird type, bias a = place, group = 2y + place. The class words are the bird
species named by the image folders (FFR draws one per prompt, "a photo of {breed} ..."),
or landbird / waterbird when the images are not in species folders.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List

import numpy as np

from raybias.data.sources import (DataError, SourceData, dataset_root, file_table, int_column,
                                  read_csv_strings, split_column)

METADATA = "metadata.csv"
REQUIRED = ("img_filename", "y", "split", "place")
CLASS_NAMES = ["landbird", "waterbird"]
BIAS_NAMES = ["land", "water"]


def species_word(rel_path: str) -> str | None:
    """'001.Black_footed_Albatross/x.jpg' -> 'black footed albatross' (None without a folder)."""
    parts = Path(rel_path).parts
    if len(parts) < 2:
        return None
    name = re.sub(r"^\d+\.", "", parts[-2]).replace("_", " ").strip().lower()
    return name or None


def load(cfg) -> SourceData:
    root = dataset_root(cfg)
    meta_path = root / METADATA
    if not meta_path.is_file():
        raise DataError(f"Waterbirds metadata not found: {meta_path} (data.root should be the folder "
                        "holding metadata.csv and the species folders)")
    meta = read_csv_strings(meta_path, REQUIRED, "Waterbirds metadata")
    y = int_column(meta, "y", meta_path, allowed=(0, 1))
    a = int_column(meta, "place", meta_path, allowed=(0, 1))
    split = split_column(meta, "split", meta_path)
    rel = meta["img_filename"].str.strip().tolist()
    if "img_id" in meta.columns:
        raw_ids = meta["img_id"].str.strip()
        ids = [f"wb-{v}" if v else f"wb-row{i}" for i, v in enumerate(raw_ids)]
        labels = [f"line {i + 2} (img_id {v})" if v else f"line {i + 2}" for i, v in enumerate(raw_ids)]
    else:
        ids = [f"wb-row{i}" for i in range(len(meta))]
        labels = [f"line {i + 2}" for i in range(len(meta))]
    # Paths are checked (inside data.root, no file listed twice) in file_table.
    table = file_table(ids=ids, paths=rel, y=y, a=a, split=split, n_bias=2, root=root, where=str(meta_path),
                       labels=labels)

    class_words: List[List[str]] = []
    for label in (0, 1):
        species = sorted({w for w, yy in zip(map(species_word, rel), y) if yy == label and w})
        class_words.append(species or [CLASS_NAMES[label]])
    return SourceData(
        table=table, n_classes=2, n_bias=2,
        class_names=list(CLASS_NAMES), bias_names=list(BIAS_NAMES),
        class_words=class_words, bias_words=list(BIAS_NAMES),
        prompt_template="a photo of a {member} on {bias}",
        extra={"metadata": str(meta_path), "n_species": int(np.sum([len(w) for w in class_words]))},
    )
