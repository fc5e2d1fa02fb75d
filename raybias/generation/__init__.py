"""Group-balanced synthetic data at scale: plan, sampler actor pool, shards, resume.

- `plan`: how many images each group (and cluster) gets, which model makes them, with which
  prompt and seed, cut into work units of one model each (`synthetic/<gen>/plan.json`: a unit
  table from which `PlanUnits` derives each unit's ids, seeds and prompts).
- `shards`: one Parquet shard per work unit, renamed into place when whole; finding the
  units that are done and redoing the ones a crash left unreadable.
- `sampler`: the Ray Data actor that loads the base pipeline once, switches LoRA adapters /
  DreamBooth UNets per unit and writes each unit's shard.
- `runner`: the driver — unit numbers in blocks of one model through an actor pool, progress,
  sample grid.
- `scoring`: the filter's actors (group centroids of real images; class-prompt + centroid scores).
"""
