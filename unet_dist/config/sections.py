"""The run configuration's sections: every key, its type and its default.

These dataclasses are the one place defaults live: the model, the augmenter and the patch stream
take them (or a spec built from them) and carry none of their own. Loading and type checks are in
config/loading.py, the rules between keys in config/rules.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class AugmentConfig:
    flip: bool = True
    rot90: bool = True
    elastic: bool = True
    elastic_grid: int = 3  # control points per axis of the coarse displacement grid
    elastic_sigma: float = 10.0  # displacement std in pixels at the control points
    intensity: bool = True  # brightness, contrast, gamma
    noise_std: float = 0.03
    missing_section_p: float = 0.0  # 3D only
    misalign_p: float = 0.0  # 3D only
    misalign_max_px: int = 8

    @classmethod
    def disabled(cls) -> "AugmentConfig":
        """Every augmentation off: patches as the store holds them (tests, benchmarks)."""
        return cls(flip=False, rot90=False, elastic=False, intensity=False, noise_std=0.0,
                   missing_section_p=0.0, misalign_p=0.0)


@dataclass
class VolumeConfig:
    """One of several training volumes (`data.volumes`, e.g. CREMI's samples A, B and C).

    "" takes the data section's value (`data.raw_array`, `data.labels`, `data.ignore`)."""

    store: str = ""
    name: str = ""  # in metric names (val/<name>/dice_membrane); "": the store's folder name without suffix
    raw_array: str = ""
    labels: str = ""
    ignore: str = ""
    train_slices: list[int] = field(default_factory=list)  # [start, stop); []: every slice outside val_slices
    val_slices: list[int] = field(default_factory=list)  # [start, stop); []: not validated
    weight: float = 1.0  # a patch comes from this volume with probability weight / sum of weights; 0: none


@dataclass
class DataConfig:
    store: str = "runs/isbi2012.zarr"  # ours, or any Zarr v2/v3 (OME-Zarr) store, read as it is
    # The arrays inside `store` (data/volumes.py): a path, or an OME multiscale group (its level 0).
    # The defaults are the layout `convert` writes; `labels` without a "/" names a label image.
    raw_array: str = "0"
    labels: str = "neuron_interior"
    # The instance IDs (one per neuron, 0 = boundary/background) affinity targets are computed from
    # (model.target: affinities), after augmentation: `convert --instances` writes this label image.
    ids: str = "neuron_ids"
    # Unlabelled voxels (1 = never in the loss or a count): the label image `convert --ignore-*` writes,
    # used when the store has it; a label image name or a path; "" ignores nothing.
    ignore: str = "ignore"
    # A patch is drawn again (from the same random stream) while less than this fraction of the voxels
    # that reach the loss is labelled; only stores with an ignore mask have unlabelled voxels.
    min_labelled_fraction: float = 0.5
    # Refuse a chunk layout where a random patch would read more chunk files than this (convert it).
    max_files_per_patch: int = 256
    train_slices: list[int] = field(default_factory=lambda: [0, 25])  # [start, stop)
    val_slices: list[int] = field(default_factory=lambda: [25, 30])
    holdout_slices: list[int] = field(default_factory=list)  # [start, stop) kept out of training (CV folds)
    patch_size: list[int] = field(default_factory=lambda: [256, 256])  # (Y, X) or (Z, Y, X)
    batch_size: int = 4  # per rank
    num_workers: int = 2
    start_method: Literal["fork", "forkserver", "spawn"] = "fork"
    prefetch_factor: int = 4
    # Seconds the trainer waits for one batch before it ends the run naming the stalled loader worker
    # (a hung file system, a stopped process); far above what a healthy loader takes. 0: wait forever.
    loader_timeout_s: float = 300.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Several volumes in one run (data/training_set.py); when set, data.store, data.train_slices and
    # data.val_slices are not used. Validation reports each volume (val/<name>/...) and all pooled (val/...).
    volumes: list[VolumeConfig] = field(default_factory=list)


@dataclass
class ModelConfig:
    dims: Literal[2, 3] = 2
    in_channels: int = 1
    out_channels: int = 1
    depth: int = 4
    base_channels: int = 64
    norm: Literal["batch", "group", "instance", "none"] = "batch"
    upsample: Literal["transpose", "interp"] = "transpose"
    padding: Literal["same", "valid"] = "same"
    anisotropic_levels: int = 0  # 3D: the first levels pool only in y, x (thick sections)
    # What the network predicts: "membrane" (the probability of neuron interior, from data.labels) or
    # "affinities" (one channel per offset: 1 where a voxel and its neighbour at that offset carry the
    # same nonzero ID of data.ids, as in Lee et al. 2017 and PyTorch Connectomics' seg_to_aff).
    target: Literal["membrane", "affinities"] = "membrane"
    # (z, y, x) voxel offsets of the affinity channels; []: the nearest neighbours (3D: z, y, x; 2D: y, x).
    # Long-range offsets (e.g. [0, -9, 0]) are allowed; a 2D model's offsets have z = 0.
    offsets: list[list[int]] = field(default_factory=list)

    def affinity_offsets(self) -> tuple[tuple[int, int, int], ...]:
        """The affinity channels' (z, y, x) offsets, in channel order."""
        if self.offsets:
            return tuple(tuple(int(v) for v in offset) for offset in self.offsets)
        nearest = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))
        return nearest if self.dims == 3 else nearest[1:]

    def output_channels(self) -> int:
        """Channels of the network's last 1x1 conv: one per offset for affinities, else out_channels."""
        return len(self.affinity_offsets()) if self.target == "affinities" else self.out_channels


@dataclass
class TrainConfig:
    steps: int = 2000
    lr: float = 1e-3
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 disables
    accumulate: int = 1  # micro-batches per optimizer step
    # Patches per optimizer step over all ranks; when set (> 0), train.accumulate is chosen from it
    # and the ranks at hand, so a run resumed on another number of ranks keeps its global batch.
    global_batch: int = 0
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    loss: Literal["bce", "bce_dice"] = "bce"
    weight_map: bool = False  # the U-Net paper's class balance + border weights
    weight_map_w0: float = 10.0
    weight_map_sigma: float = 5.0
    max_nonfinite_steps: int = 20  # consecutive non-finite losses before the run stops
    seed: int = 0
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    sync_batchnorm: bool = False
    channels_last: bool = False
    compile: bool = False
    val_every: int = 200
    ckpt_every: int = 200
    keep_last: int = 3
    log_every: int = 10
    dist_timeout_s: int = 600  # collective timeout: a dead rank ends the job instead of hanging it


@dataclass
class PredictConfig:
    block_size: list[int] = field(default_factory=lambda: [1, 512, 512])  # output block (Z, Y, X)
    halo: list[int] = field(default_factory=lambda: [0, 32, 32])  # context per side (Z, Y, X)
    # Blocks per output shard (Z, Y, X): each shard is one file holding that many blocks (Zarr v3
    # sharding), so a volume has that many times fewer files for Lustre/GPFS and the kernel to create.
    # Each rank writes whole shards. [1, 1, 1]: a file per block (unsharded).
    shard_blocks: list[int] = field(default_factory=lambda: [1, 4, 4])
    batch_size: int = 4
    tta: bool = False
    probability_dtype: Literal["uint8", "float16"] = "uint8"
    threshold: float = 0.5
    # coarser levels (for viewers) halve y, x (and z when near-isotropic) down to this largest side
    pyramid_max_side: int = 256
    # Threads that read (decode) block inputs and write (encode) finished blocks; 0: from the cores
    # this process may use (predict.io_threads). Neither changes a number of the output.
    readers: int = 0
    writers: int = 0
    # Decoded input chunks shared by neighbouring blocks (each chunk is decoded once and dropped after
    # its last block); the cap only matters for layouts whose chunks span many block rows. 0: no cache.
    chunk_cache_mb: int = 1024
    # zarr-python's codec pipeline ("zarr") or the Rust one from the `zarrs` package ("zarrs").
    codec_pipeline: Literal["zarr", "zarrs"] = "zarr"


@dataclass
class SegmentConfig:
    """`unet-dist segment`: blockwise fragments, edges across block faces, one global merge."""

    block_size: list[int] = field(default_factory=lambda: [32, 256, 256])  # (Z, Y, X), one chunk of labels/neurons
    halo: list[int] = field(default_factory=lambda: [4, 16, 16])  # context per side for the fragments' watershed
    # an edge's score: the `quantile` of the link values (affinities; membrane path: the smaller interior
    # probability of the two voxels) along the contact, as MALA / LSD / waterz, or their mean
    edge_score: Literal["quantile", "mean"] = "quantile"
    quantile: float = 0.75
    # the edge score at which fragments merge. 0.7: on the FIB volume's true affinities blurred (sigma 1)
    # with noise 0.2, quantile scores are best at 0.65-0.75 (VOI 0.09-0.10) and merge neurons at 0.6
    threshold: float = 0.7
    # union_find: every edge >= threshold joins; mean: the best edge first, merged edges' statistics
    # added and rescored (as waterz / LSD agglomerate), until the best is below threshold
    merge: Literal["union_find", "mean"] = "mean"
    # voxels whose smoothed boundary is below this may seed a fragment: 0.3, not 0.5, because a trained
    # network's boundaries are soft (FIB validation split, step 400: 16 fragments and VOI 2.0 at 0.5;
    # 192 and VOI 0.31 at 0.3, 211 and 0.31 at 0.2)
    seed_boundary: float = 0.3
    seed_spacing: int = 2  # seeds are maxima of the distance to the boundary within (2 s + 1) voxels
    # voxels whose boundary map exceeds this stay 0 (no neuron: the layer between neurons); 1: none
    background: float = 0.9
    smooth_sigma: float = 0.5  # Gaussian smoothing (voxels) of the boundary map before the watershed


@dataclass
class LoggingConfig:
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online with a key
    project: str = "unet_dist"
    entity: str = ""
    progress: Literal["auto", "bar", "plain"] = "auto"  # auto: a bar on a TTY, lines otherwise
    images: bool = True  # raw with prediction / ground-truth masks and the error overlay at each validation
    tags: list[str] = field(default_factory=list)
    group: str = ""  # W&B group: cv puts its folds in one ("cv-<run dir name>" unless set)
    job_type: str = "train"
    # checkpoints as W&B artifacts (aliases latest, best): auto = only when a checkpoint file is at
    # most artifact_max_mb (each upload is a full copy; large models would flood the project)
    checkpoint_artifacts: Literal["auto", "always", "never"] = "auto"
    artifact_max_mb: float = 100.0


@dataclass
class LaunchConfig:
    nodes: int = 1
    gpus_per_node: int = 1
    # 0: what the cluster's nodes announce per task (sinfo; the local executor: this machine's cores),
    # at most 8; a recipe with many loader workers sets its own (configs/isbi2012.yaml: 9)
    cpus_per_task: int = 0
    partition: str = ""
    time_min: int = 240
    mem_gb: int = 0  # 0: the partition's default
    max_requeues: int = 3


@dataclass
class RunConfig:
    dir: str = "runs/default"
    name: str = ""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    run: RunConfig = field(default_factory=RunConfig)
