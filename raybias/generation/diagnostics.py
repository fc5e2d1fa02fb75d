"""Diagnostics of a generator's synthetic set, per group, that no anchor paper reports.

For each group g of generator `gen`, on a sample of at most `diagnostics.sample_per_group`
generated images (all of them, before the filter) and as many real training images of g:

- label fidelity: the share of generated images in which a reader finds the class and the
  bias value that were asked for. The reader is the filter's own: the oracle (builtin embedder
  on colored_digits: digit argmax among the class's member digits, colour argmax = the group's
  colour word), or CLIP zero-shot with embed.embedder=clip (the group whose prompts' mean text
  embedding is nearest the image: its class, its bias value). The same reader on the sampled
  real images gives the fidelity a perfect generator would reach (the reader's own error);
- diversity: the mean pairwise cosine distance (1 - cos) of the embeddings of the group's
  generated images, beside the real group's;
- distance to the real group: KID (Binkowski et al. 2018), the unbiased estimate of MMD^2
  with the polynomial kernel k(x, y) = (x.y / d + 1)^3 between the generated and the real
  group's embeddings (one estimate on the whole sample; both sides need 2 images).

Embeddings are embed.embedder's (what clustering and the filter's centroids use). The sampled
rows are drawn from the shards' id/group columns only (data/rows.choose_rows: seeded, by id);
a Ray Data actor pool (`DiagnosticReader`, embed.concurrency actors, like the filter's) reads
just those rows of each shard, embeds them and reads their labels; only vectors and flags come
back. The real images are read from data/real rather than taken from embed/vectors: the reader
needs their pixels anyway, and one embedder instance then embeds both sides.

Writes synthetic/<gen>/diagnostics.json, recorded as `diagnostics/<gen>` through the stage
lifecycle (`RunDir.stage`; hash: the generator's filter sections + `diagnostics`); the report
renders the table and plot.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

import numpy as np
import pandas as pd
import pyarrow as pa

from raybias.config import ConfigError
from raybias.console import say
from raybias.data.info import DatasetInfo
from raybias.layout import PREPARE_KEY, diagnostics_key, diagnostics_path, generate_key, scores_path, shard_path
from raybias.methods import diagnostics_sections, generators_needed
from raybias.registry import GENERATORS
from raybias.rundir import RunDir

READERS = ("oracle", "clip", "none")


# --- the measures -----------------------------------------------------------------------------

def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x.y / d + 1)^3, the kernel of KID (Binkowski et al. 2018), for all pairs."""
    d = x.shape[1]
    return (x @ y.T / d + 1.0) ** 3


def kid(x: np.ndarray, y: np.ndarray) -> Optional[float]:
    """Unbiased MMD^2 between samples x [m, d] and y [n, d] under `polynomial_kernel`:
    sum_{i != j} k(x_i, x_j) / (m (m-1)) + sum_{i != j} k(y_i, y_j) / (n (n-1))
    - 2 sum_{i, j} k(x_i, y_j) / (m n). None when a side has fewer than 2 rows."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        return None
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * kxy.mean())


def mean_pairwise_distance(x: np.ndarray) -> Optional[float]:
    """Mean of 1 - cos(x_i, x_j) over the pairs i < j; None for fewer than 2 rows."""
    x = np.asarray(x, np.float64)
    if len(x) < 2:
        return None
    z = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    cos = z @ z.T
    n = len(z)
    return float(1.0 - (cos.sum() - np.trace(cos)) / (n * (n - 1)))


def reader_kind(embedder: str, source: str) -> str:
    """Who reads the labels of an image: clip (zero-shot, embed.embedder=clip), the oracle
    (colored_digits with the builtin embedder), or none (no reader for this data)."""
    if embedder == "clip":
        return "clip"
    if source == "colored_digits":
        return "oracle"
    return "none"


# --- the actor --------------------------------------------------------------------------------

class DiagnosticReader:
    """Ray Data actor: per row {set, path (run-relative), rows}, reads those rows of one shard
    (synthetic or real), embeds their images and reads their labels; returns set, id, group,
    vector, class_ok, bias_ok (nulls without a reader)."""

    def __init__(self, run_spec: str, embed_options: Dict[str, Any], reader: str, n_bias: int,
                 digits: Optional[List[List[int]]] = None, colors: Optional[List[int]] = None,
                 group_prompts: Optional[List[List[str]]] = None, oracle_folder: Optional[str] = None):
        from raybias.embed import get_embedder
        from raybias.generation.scoring import mean_text_embeddings

        self.run_spec = run_spec
        self.batch_size = int(embed_options.get("batch_size") or 256)
        self.embedder = get_embedder(embed_options)
        self.reader = reader
        self.n_bias = int(n_bias)
        self.digits = digits
        self.colors = colors
        self.group_text = mean_text_embeddings(self.embedder, group_prompts) if reader == "clip" else None
        self.oracle = None
        if reader == "oracle":
            from raybias.diffusion.oracle import load_oracle

            self.oracle = load_oracle(oracle_folder)

    def read_labels(self, images: List[bytes], vectors: np.ndarray, y: np.ndarray, a: np.ndarray):
        """(class right, bias right) per image, as the reader sees them."""
        if self.reader == "oracle":
            from raybias.generation.scoring import oracle_probs

            digit_probs, color_probs = oracle_probs(images, self.oracle)
            digit, color = digit_probs.argmax(1), color_probs.argmax(1)
            class_ok = np.array([int(digit[i]) in self.digits[int(y[i])] for i in range(len(y))])
            bias_ok = color == np.asarray(self.colors)[a]
            return class_ok, bias_ok
        group = (vectors @ self.group_text.T).argmax(1)  # zero-shot: the nearest group prompt
        return group // self.n_bias == y, group % self.n_bias == a

    def __call__(self, batch: Dict[str, np.ndarray]) -> pa.Table:
        from raybias.embed.vectors import vector_array
        from raybias.data.rows import read_rows

        parts = []
        run = RunDir(self.run_spec)
        for name, path, rows in zip(batch["set"], batch["path"], batch["rows"]):
            rows = [int(r) for r in rows]
            cols = {c: read_rows(run, str(path), rows, column=c) for c in ("id", "group", "y", "a")}
            images = read_rows(run, str(path), rows, column="image")
            for start in range(0, len(rows), self.batch_size):
                chunk = slice(start, start + self.batch_size)
                vectors = self.embedder.embed_images(images[chunk])
                y, a = np.asarray(cols["y"][chunk], np.int64), np.asarray(cols["a"][chunk], np.int64)
                if self.reader == "none":
                    class_ok = bias_ok = pa.nulls(len(y), pa.bool_())
                else:
                    c_ok, b_ok = self.read_labels(images[chunk], vectors, y, a)
                    class_ok, bias_ok = pa.array(np.asarray(c_ok, bool)), pa.array(np.asarray(b_ok, bool))
                parts.append(pa.table({"set": [str(name)] * len(y), "id": cols["id"][chunk], "group": pa.array(cols["group"][chunk], pa.int64()),
                                       "vector": vector_array(vectors), "class_ok": class_ok, "bias_ok": bias_ok}))
        return pa.concat_tables(parts)


# --- the driver -------------------------------------------------------------------------------

def _picks_by_file(name: str, files: List[str], picks: Dict[int, pd.DataFrame]) -> List[Dict[str, Any]]:
    """The pool's input for set `name`: one row per file holding a picked row, with its row numbers."""
    rows: Dict[int, List[int]] = {}
    for df in picks.values():
        for f, r in zip(df["file"], df["row"]):
            rows.setdefault(int(f), []).append(int(r))
    return [{"set": name, "path": files[f], "rows": sorted(rs)} for f, rs in sorted(rows.items())]


def _read_with_pool(cfg, run: RunDir, items: List[Dict[str, Any]], actor_kwargs: Dict[str, Any]) -> pd.DataFrame:
    """Every item's rows, embedded and read by one actor pool: set, id, group, vector, class_ok, bias_ok."""
    import ray

    from raybias.embed.vectors import column_to_matrix, embedding_pool
    
    ds = ray.data.from_items(items, override_num_blocks=len(items))  # paths run-relative
    ds = ds.map_batches(DiagnosticReader, fn_constructor_kwargs=dict(run_spec=run.spec(), **actor_kwargs),
                        **embedding_pool(actor_kwargs["embed_options"], len(items)))
    table = pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None)))
    df = table.drop(["vector"]).to_pandas()
    df["vector"] = list(column_to_matrix(table.column("vector")))
    return df.sort_values(["set", "id"], kind="stable").reset_index(drop=True)


def _share(flags: pd.Series) -> Optional[float]:
    flags = flags.dropna()
    return None if flags.empty else float(flags.astype(bool).mean())


def _both(df: pd.DataFrame) -> pd.Series:
    """Class and bias both read right, per row (empty when there is no reader)."""
    if df.empty or df["class_ok"].isna().any():
        return pd.Series(dtype=object)
    return df["class_ok"].astype(bool) & df["bias_ok"].astype(bool)


def _matrix(df: pd.DataFrame) -> np.ndarray:
    return np.stack(df["vector"].to_list()) if len(df) else np.zeros((0, 1))


def group_diagnostics(syn: pd.DataFrame, real: pd.DataFrame, g: int, n_generated: int) -> Dict[str, Any]:
    """One group's record from the sampled rows (vector, class_ok, bias_ok; syn also keep)."""
    s, r = syn[syn["group"] == g], real[real["group"] == g]
    kept = s[s["keep"]]
    xs, xr = _matrix(s), _matrix(r)
    return {"group": int(g), "n_generated": int(n_generated), "n_sampled": int(len(s)), "n_real": int(len(r)),
            "n_kept_sampled": int(len(kept)),
            "class_fidelity": _share(s["class_ok"]), "bias_fidelity": _share(s["bias_ok"]),
            "fidelity": _share(_both(s)), "fidelity_kept": _share(_both(kept)), "real_fidelity": _share(_both(r)),
            "diversity": mean_pairwise_distance(xs), "real_diversity": mean_pairwise_distance(xr),
            "kid": kid(xs, xr) if len(s) and len(r) else None}


def _reader_kwargs(cfg, info: DatasetInfo, reader: str) -> Dict[str, Any]:
    from raybias.embed import embed_options

    kwargs: Dict[str, Any] = {"embed_options": embed_options(cfg.embed), "reader": reader, "n_bias": info.n_bias,
                              "oracle_folder": cfg.filter.oracle}
    if reader == "oracle":
        from raybias.diffusion.oracle import load_oracle
        from raybias.generation.scoring import class_digits

        palette = load_oracle(cfg.filter.oracle).palette
        unknown = [w for w in info.bias_words if w not in palette]
        if unknown:
            raise ConfigError(f"diagnostics: the bias words {unknown} (data.bias_words) are not colours the oracle "
                              f"knows ({', '.join(palette)}), so it cannot read them; set embed.embedder=clip or "
                              "diagnostics.enabled=false")
        kwargs.update(digits=class_digits(info), colors=[palette.index(w) for w in info.bias_words])
    elif reader == "clip":
        from raybias.generation.scoring import group_prompt_texts

        kwargs["group_prompts"] = [group_prompt_texts(info, g) for g in range(info.n_groups)]
    return kwargs


def _kept_ids(run: RunDir, generator: str) -> Optional[Dict[str, bool]]:
    """id -> kept by the filter; None when the set was not filtered (every image kept)."""
    if not run.exists(scores_path(generator)):
        return None
    import pyarrow.parquet as pq

    scores = pq.read_table(run.path(scores_path(generator)), columns=["id", "keep"], filesystem=run.fs).to_pandas()
    return dict(zip(scores["id"], scores["keep"].astype(bool)))


REAL_SET = "real"  # the pool's tag of the real training images (no generator is named so)


def diagnose_sets(cfg, run: RunDir, stages: Dict[str, Any], verbose: bool = True) -> Dict[str, Dict[str, Any]]:
    """Measure the generators' synthetic sets per group in one actor-pool pass (the real sample,
    the same for all, read once); `stages`: generator -> its begun `Stage` (RunDir.stage), which
    is finished once its diagnostics.json is written."""
    from raybias.data.synthetic import finished_units
    from raybias.ray_utils import init_ray, require_gpus
    from raybias.data.rows import choose_rows, real_train_meta, shard_meta

    start = time.time()
    info = DatasetInfo.load(run)
    d = cfg.diagnostics
    n, seed = int(d.sample_per_group), int(d.seed)
    reader = reader_kind(cfg.embed.embedder, info.source)
    kwargs = _reader_kwargs(cfg, info, reader)
    init_ray(cfg)
    require_gpus(float(cfg.embed.num_gpus or 0), "diagnostics (embed.num_gpus)")
    real_files, real_meta = real_train_meta(run)
    items = _picks_by_file(REAL_SET, real_files, choose_rows(real_meta, info.n_groups, n, seed, REAL_SET))
    generators = list(stages)
    generated: Dict[str, pd.Series] = {}
    for gen in generators:
        files = [shard_path(gen, u) for u in finished_units(run, gen)]
        meta = shard_meta(run, files, ["id", "group"])
        generated[gen] = meta["group"].value_counts()
        items += _picks_by_file(gen, files, choose_rows(meta, info.n_groups, n, seed, gen))
    rows = _read_with_pool(cfg, run, items, kwargs)
    real = rows[rows["set"] == REAL_SET]
    seconds = time.time() - start
    out = {}
    for gen in generators:
        syn = rows[rows["set"] == gen].copy()
        keep = _kept_ids(run, gen)
        syn["keep"] = True if keep is None else syn["id"].map(keep).fillna(False).astype(bool)
        groups = [dict(group_diagnostics(syn, real, g, int(generated[gen].get(g, 0))), name=info.group_name(g))
                  for g in range(info.n_groups)]
        record = {"generator": gen, "embedder": cfg.embed.embedder, "reader": reader, "sample_per_group": n,
                  "seed": seed, "groups": groups, "seconds": seconds, "measured_with": list(generators)}
        run.write_json(diagnostics_path(gen), record)
        stages[gen].finish({"reader": reader, "seconds": seconds})
        out[gen] = record
        if verbose:
            fid = [g["fidelity"] for g in groups if g["fidelity"] is not None]
            say(f"diagnostics {gen}: {len(syn)} generated and {len(real)} real images measured"
                + (f"; label fidelity ({reader}) {100 * np.mean(fid):.1f} % averaged over groups" if fid else ""))
    return out


def run_diagnostics(cfg, run: RunDir, mode: str = "fresh", verbose: bool = True) -> Dict[str, Dict[str, Any]]:
    """Every text-to-image generator of `methods:` whose synthetic set is finished; a set measured
    earlier with the same config is read back."""
    if not cfg.diagnostics.enabled:
        return {}
    out, todo = {}, {}
    for gen in generators_needed(list(cfg.methods)):
        if gen not in GENERATORS or not run.is_done(generate_key(gen)):
            continue
        path = diagnostics_path(gen)
        # skipped only while its file is whole; a regenerated set (new generate/filter config) changes the hash
        st = run.stage(diagnostics_key(gen), cfg, diagnostics_sections(gen), mode, outputs=(path,), owns=(path,),
                       needs=(PREPARE_KEY, generate_key(gen)))
        if st.skip:
            out[gen] = run.read_json(path)
        else:
            todo[gen] = st
    if todo:
        out.update(diagnose_sets(cfg, run, todo, verbose))
    return out
