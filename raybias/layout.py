"""The run directory's layout: every run-relative path, and every stage key of `manifest.json`.

The one owner of where things live. Stages, Ray workers, the report and the sweep name their
artifacts through this module only; no other module spells a run-relative path. It is a leaf
(it imports nothing from raybias), so anything may import it, workers included. Paths are
run-relative, "/"-separated strings for `RunDir` (`run.path(rel)`, `run.exists(rel)` ...).

    manifest.json                              per stage key: config hash, units, done, seconds
    .manifest.lock                             (local disk) the flock of manifest writers
    lease.json                                 the single-writer lease (rundir.Lease)
    logs/<command>-<time>-<pid>.log            what a command printed besides raybias's lines
    data/info.json                             DatasetInfo: classes, bias values, words, counts
    data/real/*.parquet + _SUCCESS             the prepared real images (severity applied to train)
    base/model/                                `raybias base`: the rebuilt builtin backbone
    base/oracle/                               the oracle trained on the same corpus
    base/quality.json, model_info.json         recognition per guidance / a hub model's components
    base/samples.png, corpus.png, guidance.png, loss.png
    embed/vectors/*.parquet + _SUCCESS         id, group, vector (L2-normalised)
    embed/clusters.parquet, clusters.json      id, group, cluster; per group k, sizes, centroids
    embed/clusters_projection.png, clusters_samples.png
    generators/<gen>/manifest.json             the models `finetune` trained (the contract with generate)
    generators/<gen>/<model>/                  one model: weights, previews.json, preview-<k>.png,
                                               training.json (written last: the folder is whole)
    generators/<gen>/samples.png               base vs. fine-tuned samples per model
    generators/<gen>/_train/<job or pack>/     Ray Train checkpoints of the fine-tuning jobs
    generators/<gen>/_class/<g>-<key>.npz      prior-preservation class images (a cache)
    generators/ddb/cond/                       DDB's class-conditional diffusion model
    generators/ddb/amplifier/                  model.safetensors, outputs.parquet, conflict.json
    synthetic/<gen>/plan.json                  counts, models, the unit table (ids, seeds, prompts derived)
    synthetic/<gen>/shards/unit-NNNNN.parquet  one work unit each, renamed into place when whole
    synthetic/<gen>/scores.parquet, scores.png the filter's scores and keep flags; histograms
    synthetic/<gen>/samples.png                the first images of each model
    synthetic/<gen>/diagnostics.json           per group: label fidelity, diversity, KID to the real group
    classifiers/<method>/<seed>/               metrics.json, model.safetensors, curves.png, the
                                               method's artifacts; train-<method>-<seed>/ (Ray
                                               Train checkpoints, removed when done)
    report/report.md, timings.json, results_by_seed.csv, wga_by_method.png, samples.png,
                                               diagnostics.png
    sweeps/<name>/                             a sweep directory (below)

A sweep directory (`sweeps/<name>/`) holds one run directory per severity
(`severity-<s>/`, laid out as above), `results.csv`, `report.md`,
`wga_vs_severity_r<ratio>.png` and Ray Tune's experiment state `tune/<name>/`.

Stage keys in manifest.json: `prepare`, `base`, `embed`, `cluster`, `finetune/<gen>`,
`generate/<gen>`, `filter/<gen>`, `diagnostics/<gen>`, `ddb/model`, `ddb/generate`, `ddb/amplifier`,
`train/<method>/<seed>`.
"""

from __future__ import annotations

from typing import Optional

# --- the run directory's own files ----------------------------------------------------------

MANIFEST = "manifest.json"  # stage records (RunDir.manifest)
MANIFEST_LOCK = ".manifest.lock"  # on a local disk: the flock around manifest read-modify-writes
LEASE = "lease.json"  # the single-writer lease (rundir.Lease)
LOGS = "logs"  # captured output of each command (console.capture)


def log_file(name: str) -> str:
    """One command's captured output (uploaded here for a run on an object store)."""
    return f"{LOGS}/{name}"


# --- data: `raybias prepare` ------------------------------------------------------------------

INFO = "data/info.json"  # DatasetInfo of the prepared dataset
REAL = "data/real"  # the prepared real images: Parquet shards + _SUCCESS

# --- base: `raybias base` ---------------------------------------------------------------------

BASE_DIR = "base"  # the base stage's outputs (plots are here)
BASE_MODEL_DIR = f"{BASE_DIR}/model"  # the rebuilt builtin StableDiffusionPipeline
BASE_ORACLE_DIR = f"{BASE_DIR}/oracle"  # the oracle trained on the same corpus
BASE_QUALITY = f"{BASE_DIR}/quality.json"  # recognition rates per guidance, best guidance, timings
BASE_MODEL_INFO = f"{BASE_DIR}/model_info.json"  # a hub/folder base model's components and size
BASE_SAMPLES_PNG = f"{BASE_DIR}/samples.png"  # one generation per (colour, digit)
BASE_CORPUS_PNG = f"{BASE_DIR}/corpus.png"  # a sample of the rendered font corpus
BASE_GUIDANCE_PNG = f"{BASE_DIR}/guidance.png"  # recognition vs. guidance scale
BASE_LOSS_PNG = f"{BASE_DIR}/loss.png"  # VAE and UNet training losses

# --- embed and cluster ------------------------------------------------------------------------

EMBED_DIR = "embed"  # embeddings and clusters of the real training images
VECTORS = f"{EMBED_DIR}/vectors"  # id, group, vector: Parquet shards + _SUCCESS
CLUSTERS_PARQUET = f"{EMBED_DIR}/clusters.parquet"  # id, group, cluster
CLUSTERS_JSON = f"{EMBED_DIR}/clusters.json"  # per group: k, sizes, centroids, inertia
CLUSTERS_PROJECTION_PNG = f"{EMBED_DIR}/clusters_projection.png"  # 2-D projection per group
CLUSTERS_SAMPLES_PNG = f"{EMBED_DIR}/clusters_samples.png"  # the images nearest each centroid

# --- generators: `raybias finetune` (and DDB's model) -----------------------------------------

GENERATORS_DIR = "generators"  # one folder per fine-tuned generator
TRAINING_JSON = "training.json"  # in a model folder: its training record, written last
PREVIEWS_JSON = "previews.json"  # in a model folder: the labels of its preview rows


def generator_dir(generator: str) -> str:
    """Everything `finetune` made for one generator."""
    return f"{GENERATORS_DIR}/{generator}"


def generator_manifest(generator: str) -> str:
    """The generator's models (group, cluster, folder, prompt ...): the contract with generate."""
    return f"{generator_dir(generator)}/manifest.json"


def generator_samples(generator: str) -> str:
    """Base vs. fine-tuned samples of each of the generator's models."""
    return f"{generator_dir(generator)}/samples.png"


def model_dir(generator: str, name: str) -> str:
    """One trained model (LoRA weights or a pipeline folder); its TRAINING_JSON is written last."""
    return f"{generator_dir(generator)}/{name}"


def training_json(generator: str, name: str) -> str:
    """A model's training record (loss per step, attempts, timings): the model is published."""
    return f"{model_dir(generator, name)}/{TRAINING_JSON}"


def previews_json(generator: str, name: str) -> str:
    """A model's preview labels (one per preview_png)."""
    return f"{model_dir(generator, name)}/{PREVIEWS_JSON}"


def preview_name(k: int) -> str:
    """File name, in a model folder, of its k-th preview row."""
    return f"preview-{k}.png"


def preview_png(generator: str, name: str, k: int) -> str:
    """A model's k-th preview row (the base model's, then its own samples)."""
    return f"{model_dir(generator, name)}/{preview_name(k)}"


def finetune_storage(generator: str) -> str:
    """Ray Train's storage of the generator's jobs: one checkpoint folder per job or pack."""
    return f"{generator_dir(generator)}/_train"


def fault_marker(generator: str, job: str) -> str:
    """Test hook (raybias.faults, point finetune.step): present once the job's worker was killed."""
    return f"{finetune_storage(generator)}/{job}.fault-marker"


def class_images_path(generator: str, group: int, key: int) -> str:
    """Cached prior-preservation images of a group, under a hash of what decides them."""
    return f"{generator_dir(generator)}/_class/{group}-{key:08x}.npz"


# --- Diffusing DeBias (`raybias ddb`) ---------------------------------------------------------

DDB = "ddb"  # the generator name DDB's model and synthetic set live under
DDB_MODEL_NAME = "cond"  # its one class-conditional model
DDB_MODEL_DIR = model_dir(DDB, DDB_MODEL_NAME)  # that model's diffusers folder
DDB_MANIFEST = generator_manifest(DDB)  # one model entry per class, all sharing DDB_MODEL_DIR
DDB_AMPLIFIER_DIR = f"{generator_dir(DDB)}/amplifier"  # the bias amplifier
DDB_AMPLIFIER_MODEL = f"{DDB_AMPLIFIER_DIR}/model.safetensors"  # its weights
DDB_AMPLIFIER_OUTPUTS = f"{DDB_AMPLIFIER_DIR}/outputs.parquet"  # its prediction and CE per real image
DDB_CONFLICT_JSON = f"{DDB_AMPLIFIER_DIR}/conflict.json"  # its pseudo-conflicting set vs. the true one

# --- synthetic sets: `raybias generate` and `raybias filter` ----------------------------------

SYNTHETIC_DIR = "synthetic"  # one folder per generator's synthetic set


def synthetic_dir(generator: str) -> str:
    """A generator's synthetic set: plan, shards, filter scores, samples."""
    return f"{SYNTHETIC_DIR}/{generator}"


def plan_path(generator: str) -> str:
    """The generation plan (counts, models, the unit table)."""
    return f"{synthetic_dir(generator)}/plan.json"


def shards_dir(generator: str) -> str:
    """One Parquet shard per finished work unit."""
    return f"{synthetic_dir(generator)}/shards"


def unit_name(unit: int) -> str:
    """File name of a unit's shard in shards_dir (temporary names never look like this)."""
    return f"unit-{unit:05d}.parquet"


def unit_of(name: str) -> Optional[int]:
    """The unit number of a shard's file name (unit_name's inverse), or None for another file."""
    if name.startswith("unit-") and name.endswith(".parquet"):
        return int(name[5:-8])
    return None


def shard_path(generator: str, unit: int) -> str:
    """A finished unit's shard."""
    return f"{shards_dir(generator)}/{unit_name(unit)}"


def scores_path(generator: str) -> str:
    """The filter's output: id, group, score, keep, prompt_score, centroid_score."""
    return f"{synthetic_dir(generator)}/scores.parquet"


def scores_png(generator: str) -> str:
    """The filter's score histograms per group, with the cut."""
    return f"{synthetic_dir(generator)}/scores.png"


def synthetic_samples(generator: str) -> str:
    """The first images of each of the generator's models."""
    return f"{synthetic_dir(generator)}/samples.png"


def diagnostics_path(generator: str) -> str:
    """Per group of the synthetic set: label fidelity, diversity, KID to the real group."""
    return f"{synthetic_dir(generator)}/diagnostics.json"


# --- classifiers: `raybias train` -------------------------------------------------------------

CLASSIFIERS_DIR = "classifiers"  # classifiers/<method>/<seed>/
CLASSIFIER_MODEL = "model.safetensors"  # in a classifier folder: the selected model's weights


def classifier_dir(method: str, seed: int) -> str:
    """One trained classifier: metrics, weights, curves, the method's artifacts."""
    return f"{CLASSIFIERS_DIR}/{method}/{seed}"


def metrics_path(method: str, seed: int) -> str:
    """Per-group val/test accuracy, WGA, AGA, history (written last)."""
    return f"{classifier_dir(method, seed)}/metrics.json"


def classifier_model(method: str, seed: int) -> str:
    """The classifier's weights (the epoch chosen by validation WGA)."""
    return f"{classifier_dir(method, seed)}/{CLASSIFIER_MODEL}"


def curves_png(method: str, seed: int) -> str:
    """The classifier's training curves."""
    return f"{classifier_dir(method, seed)}/curves.png"


def trainer_name(method: str, seed: int) -> str:
    """Ray Train's run name; its checkpoints are the folder of that name in classifier_dir."""
    return f"train-{method}-{seed}"


# --- report: `raybias report` (and `raybias run`) ---------------------------------------------

REPORT_DIR = "report"  # the run's report and its figures
REPORT_MD = f"{REPORT_DIR}/report.md"  # what a user reads
TIMINGS = f"{REPORT_DIR}/timings.json"  # `raybias run`'s wall clock and seconds per stage
RESULTS_BY_SEED_CSV = f"{REPORT_DIR}/results_by_seed.csv"  # one row per (method, seed)
WGA_PNG = f"{REPORT_DIR}/wga_by_method.png"  # bar chart of WGA per method
REPORT_SAMPLES_PNG = f"{REPORT_DIR}/samples.png"  # real and synthetic images per group
DIAGNOSTICS_PNG = f"{REPORT_DIR}/diagnostics.png"  # the synthetic sets' diagnostics per generator and group

# --- sweeps: `raybias sweep` ------------------------------------------------------------------

SWEEPS_DIR = "sweeps"  # one sweep directory per sweep.name
SWEEP_RESULTS = "results.csv"  # in a sweep directory: one row per trial
SWEEP_REPORT = "report.md"  # in a sweep directory: the tables per severity
SWEEP_TUNE = "tune"  # in a sweep directory: Ray Tune's storage (tune/<name>/)


def sweep_dir(name: str) -> str:
    """A sweep directory."""
    return f"{SWEEPS_DIR}/{name}"


def severity_dir(severity: str) -> str:
    """In a sweep directory: the run directory of one severity."""
    return f"severity-{severity}"


def severity_png(ratio: float) -> str:
    """In a sweep directory: WGA vs. severity per method at one synthetic_ratio."""
    return f"wga_vs_severity_r{ratio:g}.png"


# --- stage keys in manifest.json --------------------------------------------------------------

PREPARE_KEY = "prepare"  # data/info.json and data/real
BASE_KEY = "base"  # base/
EMBED_KEY = "embed"  # embed/vectors
CLUSTER_KEY = "cluster"  # embed/clusters.*
DDB_MODEL_KEY = "ddb/model"  # DDB_MODEL_DIR and DDB_MANIFEST
DDB_GENERATE_KEY = "ddb/generate"  # synthetic/ddb/ (units: its work units)
DDB_AMPLIFIER_KEY = "ddb/amplifier"  # DDB_AMPLIFIER_DIR


def finetune_key(generator: str) -> str:
    """generators/<gen>/ (units: the finished jobs)."""
    return f"finetune/{generator}"


def generate_key(generator: str) -> str:
    """synthetic/<gen>/ plan and shards (units: every work unit, recorded when the stage
    finishes; until then each unit's shard is its record)."""
    return f"generate/{generator}"


def filter_key(generator: str) -> str:
    """synthetic/<gen>/scores.parquet."""
    return f"filter/{generator}"


def diagnostics_key(generator: str) -> str:
    """synthetic/<gen>/diagnostics.json."""
    return f"diagnostics/{generator}"


def train_key(method: str, seed: int) -> str:
    """classifiers/<method>/<seed>/."""
    return f"train/{method}/{seed}"


def stage_of(key: str) -> str:
    """The stage a stage key belongs to: `train/erm/0` -> `train`."""
    return key.split("/", 1)[0]
