"""Image (and text) embedders, and the Ray Data pipeline that embeds a table of images.

- `embedders`: the `Embedder` interface and `get_embedder` (builtin: no download; clip: a hub
  id or folder), registered by name in raybias/registry.py.
- `vectors`: `embed/vectors/`, one row per real training image: `id`, `group`, `vector`
  (fixed-size list of float32, L2-normalised), Parquet shards + `_SUCCESS`; the actor pool
  that writes it (`embed_dataset`) and its readers.
"""

from raybias.embed.embedders import (Embedder, embed_options, embedder_names, get_embedder, l2_normalize,
                                     register_embedder)
from raybias.embed.vectors import EmbedBatches, embed_dataset, read_vectors, vectors_dataset, write_vectors

__all__ = ["Embedder", "EmbedBatches", "embed_dataset", "embed_options", "embedder_names", "get_embedder",
           "l2_normalize", "read_vectors", "register_embedder", "vectors_dataset", "write_vectors"]
