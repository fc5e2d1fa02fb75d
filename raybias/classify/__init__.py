"""Classifier training: one loop on Ray Train, recipes as small registered hooks.

- `models`: the small CNN and torchvision ResNet-18/50, split into encoder + linear head.
- `losses`: per-group losses, Group-DRO's online weights, supervised contrastive loss.
- `recipes`: what `train.method` names (erm, reweight, groupdro, jtt, two_stage; DDB's in
  `ddb`), registered in raybias/registry.py: each a list of phases plus hooks (sampler
  weights, training groups, loss, phase end).
- `data`: the training sets (metadata on the driver; images decoded in memory per worker
  or streamed through Ray Data), seeded sampling and colour-preserving augmentation.
- `loop`: the per-worker training function (phases, checkpoints, model selection).
- `runner`: the driver side: one TorchTrainer per (method, seed), several at once.
- `metrics`: per-group accuracy, WGA, AGA; `collect_metrics` (one row per method and seed) and `summarize` over seeds, used by the train stage, the report and the sweep.
"""
