"""Fine-tuning: one diffusion model per group (LoRA, DreamBooth) or per (group, cluster), on Ray Train.

- `spec`: what travels to a worker, typed and picklable: `FinetuneJob` (one model: its group,
  images, prompts), `FinetuneSpec` (how every job of a generator trains, built once from the
  config by `finetune_spec`), `WorkItem` / `TrainerWork` (what one trainer trains); the job's
  prompts; `ModelEntry`, the shape of a model in `generators/<gen>/manifest.json` (written here
  and by DDB, read by the generation plan).
- `loop`: the per-worker training function and the one fine-tuning loop: a `Tuner` per model
  kind (`LoraTuner`, `DreamBoothTuner`), the checkpoint format, prior-preservation class
  images, previews, publishing the model folder.
- `runner`: the driver side: planning (borrowed groups), the progress board, one TorchTrainer
  per job or pack (`ray_utils.run_trainers`), the generator manifest and samples sheet.
"""
