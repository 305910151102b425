"""EDM's training loop on accelerate: ``train(cfg)`` for ``train_unconditional.py``.

The run is reproducible and independent of the device count (see ``data_order`` and ``step``):
resuming only needs the step number, and a resumed run is bitwise the uninterrupted one on CPU.
Checkpoints follow the atomic scheme of ``checkpoints``; sample grids and the exported EMA pipelines
with their model cards come from ``export``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger

from pipelines.ema import EDMEma
from pipelines.phema import SNAPSHOT_DIR, PowerFunctionEMA, remove_partial_snapshots
from pipelines.training.checkpoints import (
    TMP_PREFIX,
    CheckpointStore,
    check_resume_compatible,
    check_resume_data,
    is_complete_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
    training_checkpoints,
)
from pipelines.training.config import ConfigError, TrainConfig, validate_config
from pipelines.training.data_order import (
    BatchLayout,
    RankBatchSampler,
    batch_layout,
    chunk_positions,
    collate_images,
)
from pipelines.training.export import (
    RUN_INFO_FILE,
    export_pipelines,
    new_sampling_net,
    sampling_pipeline,
    save_snapshot,
)
from pipelines.training.precision import check_device_precision, resolve_mixed_precision
from pipelines.training.stats import TrainStats
from pipelines.training.step import build_adam, build_components, learning_rate, train_step
from pipelines.utils import atomic_write_text

logger = get_logger(__name__)  # accelerate's: each message once (main process), not once per process
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainResult:
    output_dir: Path
    pipeline_dirs: list[Path]
    images_seen: int
    steps: int
    nonfinite_steps: int
    last_checkpoint: Path | None
    world_size: int
    history: list[dict[str, float]] = field(default_factory=list)


def train(cfg: TrainConfig, hub_api=None) -> TrainResult:
    """Runs (or resumes) a training run; every process of an accelerate launch calls it.

    ``hub_api``: an ``huggingface_hub.HfApi`` for ``--push_to_hub`` (default: a new one).
    """
    validate_config(cfg)
    cfg = dataclasses.replace(cfg, mixed_precision=resolve_mixed_precision(cfg.mixed_precision, cfg.cpu))
    accelerator = _make_accelerator(cfg)
    check_launched_world_size(accelerator.num_processes)
    layout = batch_layout(cfg.batch_size, accelerator.num_processes, cfg.batch_per_gpu)
    dataset = open_dataset(cfg)
    conditions, labels = training_conditions(cfg, dataset)
    data = {"resolution": dataset.resolution, "channels": dataset.channels,
            "dataset_fingerprint": dataset_fingerprint(dataset)}
    store = training_checkpoints(cfg.output_dir)
    resume_path = _resume_path(cfg, store, data)
    if resume_path is None:
        _check_no_other_run(cfg, store)
    _prepare_output_dir(accelerator, cfg, store, new_run=resume_path is None)
    parts = _build_training(cfg, accelerator, dataset.resolution, dataset.channels, conditions)
    progress = _Progress(data, nonfinite_now=torch.zeros((), dtype=torch.long, device=accelerator.device))
    if resume_path is not None:
        progress.restore(load_training_checkpoint(accelerator, resume_path, parts.ema, parts.phema,
                                                  cfg.accept_inexact_resume))
        accelerator.print(f"resuming from {resume_path.name} at {progress.images_seen / 1000:g} kimg "
                          f"(step {progress.step}) of {cfg.duration_nimg / 1000:g} kimg")
    _truncate_metrics(accelerator, Path(cfg.output_dir), progress.step)
    warn_short_warmup(cfg)
    batches = _batches(cfg, dataset, layout, accelerator, progress.step, labels)
    run_info = _run_info(cfg, accelerator, layout, dataset, parts.net)
    if conditions is not None:
        run_info["conditions"] = conditions
    accelerator.init_trackers(cfg.tracker_project_name,
                              config={k: v for k, v in run_info.items() if isinstance(v, int | float | str | bool)})
    meter = _Meter(cfg, accelerator, progress)
    last_checkpoint = resume_path
    if parts.phema is not None:
        _print_phema_disk_cost(cfg, accelerator, parts.phema)

    while progress.images_seen < cfg.duration_nimg:
        before = progress.images_seen
        chunks = [(next(batches), chunk_positions(progress.step, r, accelerator.process_index, layout))
                  for r in range(layout.rounds)]
        progress.nonfinite_now += train_step(accelerator, parts.model, parts.optimizer, parts.loss_fn, chunks, cfg,
                                             layout, meter.stats, before)
        parts.ema.update(parts.net, cfg.batch_size, before)
        if parts.phema is not None:
            parts.phema.update(parts.net, cfg.batch_size, before)
        progress.images_seen, progress.step = before + cfg.batch_size, progress.step + 1
        meter.advance(cfg.batch_size)
        done = progress.images_seen >= cfg.duration_nimg

        if progress.step % cfg.logging_steps == 0 or done:
            meter.log(learning_rate(cfg, before))
        # Before the checkpoint: a run resumed from it would not write this snapshot again.
        if parts.phema is not None and (crossed_interval(before, progress.images_seen, cfg.phema_snapshot_kimg) or done):
            with meter.paused():
                _phema_snapshot(cfg, accelerator, parts.phema, progress.images_seen)
        if crossed_interval(before, progress.images_seen, cfg.checkpointing_kimg) or done:
            with meter.paused():
                last_checkpoint = save_training_checkpoint(accelerator, store, parts.ema, progress.state(cfg, accelerator),
                                                           cfg.checkpoints_total_limit, parts.phema)
        if (crossed_interval(before, progress.images_seen, cfg.snapshot_kimg) or done) and cfg.num_sample_images > 0:
            with meter.paused():
                _snapshot(cfg, accelerator, parts, progress, save_pipeline=cfg.save_pipeline_at_snapshot and not done)
    meter.close()

    pipeline_dirs = _export(cfg, accelerator, parts, run_info, progress, hub_api)
    accelerator.end_training()
    return TrainResult(Path(cfg.output_dir), pipeline_dirs, progress.images_seen, progress.step,
                       progress.nonfinite_total(), last_checkpoint, accelerator.num_processes, meter.history)


def final_images(cfg: TrainConfig, images_seen: int) -> int:
    """Images seen when the run ends: whole batches from ``images_seen`` until --duration_kimg is reached."""
    remaining = max(cfg.duration_nimg - images_seen, 0)
    return images_seen + -(-remaining // cfg.batch_size) * cfg.batch_size


def crossed_interval(before_nimg: int, after_nimg: int, every_kimg: float) -> bool:
    """Whether a step from ``before_nimg`` to ``after_nimg`` images passed a multiple of ``every_kimg``."""
    every = max(int(round(every_kimg * 1000)), 1)
    return before_nimg // every != after_nimg // every


# --------------------------------------------------------------------------------------------------
# setup and resume


def _make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    output_dir = Path(cfg.output_dir)
    accelerator = Accelerator(
        cpu=cfg.cpu,
        mixed_precision=cfg.mixed_precision,
        log_with={"none": None, "all": ["tensorboard", "wandb"]}.get(cfg.report_to, cfg.report_to),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dynamo_backend="inductor" if cfg.compile else None,
    )
    check_device_precision(cfg.mixed_precision, accelerator.device)
    return accelerator


def open_dataset(cfg: TrainConfig):
    """The training split as a ``FrameDataset``, with --resolution checked against it."""
    from pipelines.data.frame_reader import FrameDataset

    try:
        dataset = FrameDataset(cfg.dataset, split=cfg.split, channels=cfg.channels)
    except (FileNotFoundError, ValueError, KeyError, OSError) as err:
        raise ConfigError(f"--dataset {cfg.dataset} (--split {cfg.split}): {err}") from err
    if cfg.resolution is not None and cfg.resolution != dataset.resolution:
        raise ConfigError(
            f"--resolution {cfg.resolution} does not match the dataset's {dataset.resolution}x{dataset.resolution} "
            f"images ({cfg.dataset}); rebuild the dataset at {cfg.resolution} or drop --resolution"
        )
    return dataset


def check_launched_world_size(num_processes: int) -> None:
    """Refuses a CPU launch that started fewer processes than it was asked for. ``accelerate launch`` starts
    several CPU processes only through mpirun: without ``mpirun_config`` a MULTI_CPU config runs one process,
    silently, though its launcher sets MASTER_ADDR (which it does only for a config of several processes)."""
    launched_on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true"  # exported by `accelerate launch`
    started_one = num_processes == 1 and not any(os.environ.get(k) for k in ("WORLD_SIZE", "PMI_SIZE",
                                                                             "OMPI_COMM_WORLD_SIZE"))
    if launched_on_cpu and os.environ.get("MASTER_ADDR") and started_one:
        raise ConfigError(
            "accelerate launch: the config asks for several CPU processes but started one (a MULTI_CPU config needs "
            "mpirun: give its mpirun_config.mpirun_hostfile, as accelerate_configs/multi_cpu_2proc.yaml does, or "
            "start the processes with torchrun --nproc_per_node N train_unconditional.py --cpu ...; a MASTER_ADDR "
            "set in your shell for a one-process run: unset it)")


def warn_short_warmup(cfg: TrainConfig) -> None:
    """EDM's 10 Mimg warm-up is longer than any short run: such a run would end at a tiny learning rate."""
    if cfg.lr_rampup_kimg * 1000 > cfg.duration_nimg:
        final = learning_rate(cfg, cfg.duration_nimg)
        logger.warning(
            f"--lr_rampup_kimg {cfg.lr_rampup_kimg:g} is longer than --duration_kimg {cfg.duration_nimg / 1000:g}: "
            f"the learning rate only reaches {final:.3g} of --lr {cfg.lr:g} and the model may learn nothing; "
            f"pass a shorter --lr_rampup_kimg (e.g. {cfg.duration_nimg / 1000 / 10:g}, a tenth of the run)")


def dataset_fingerprint(dataset, samples: int = 16) -> str:
    """A content fingerprint of a frame dataset: its size, resolution and ``samples`` evenly spaced frames."""
    indices = sorted({int(i) for i in torch.linspace(0, len(dataset) - 1, samples).round().tolist()})
    digest = hashlib.sha256(f"{len(dataset)}:{dataset.resolution}:{dataset.channels}".encode())
    digest.update(dataset.images_uint8(indices).tobytes())
    return digest.hexdigest()


def training_conditions(cfg: TrainConfig, dataset):
    """(condition spec, per-frame labels) of ``--condition`` on the training split, or (None, None)."""
    from pipelines.data.conditions import condition_spec, dataset_labels, parse_condition_names

    try:
        names = parse_condition_names(cfg.condition)
        if not names:
            return None, None
        spec = condition_spec(dataset, names, cfg.label_dropout)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return spec, dataset_labels(dataset, spec)


def _resume_path(cfg: TrainConfig, store: CheckpointStore, data: dict[str, Any]) -> Path | None:
    """The checkpoint to resume from (checked against ``cfg``), or None for a new run."""
    if cfg.resume_from_checkpoint is None:
        return None
    path = store.latest() if cfg.resume_from_checkpoint == "latest" else Path(cfg.resume_from_checkpoint)
    if path is not None and not is_complete_checkpoint(path, store.state_file):
        raise ConfigError(f"--resume_from_checkpoint {path}: not a complete checkpoint folder (expected a folder "
                          f"with {store.state_file}, written by this script)")
    if path is None:
        logger.info(f"--resume_from_checkpoint latest: no checkpoint in {store.root}, starting a new run")
        return None
    state = store.read_state(path)
    if not isinstance(state.get("config"), dict):
        raise ConfigError(f"{path / store.state_file}: no run config; the checkpoint is damaged")
    check_resume_compatible(state["config"], cfg, path)
    check_resume_data(state, data, cfg, path)
    return path


# What a finished or running training run leaves in its output_dir (besides logs).
_RUN_OUTPUTS = ("pipeline", RUN_INFO_FILE, SNAPSHOT_DIR, "samples", "snapshots")


def _other_run_outputs(cfg: TrainConfig, store: CheckpointStore) -> list[str]:
    output_dir = Path(cfg.output_dir)
    found = [str(path.relative_to(output_dir)) for _, path in store.checkpoints()]
    found += [name for name in _RUN_OUTPUTS if (output_dir / name).exists()]
    found += sorted(p.name for p in output_dir.glob("pipeline_ema*kimg"))
    return found


def _check_no_other_run(cfg: TrainConfig, store: CheckpointStore) -> None:
    """A new run must not overwrite another run's checkpoints and pipeline (and leave its later checkpoints,
    which ``latest`` would resume) unless --overwrite."""
    found = _other_run_outputs(cfg, store)
    if found and not cfg.overwrite:
        shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
        raise ConfigError(f"--output_dir {cfg.output_dir} holds another run ({shown}); pass "
                          f"--resume_from_checkpoint latest to continue it, --overwrite to delete it and start "
                          f"anew, or another --output_dir")


def _prepare_output_dir(accelerator, cfg: TrainConfig, store: CheckpointStore, new_run: bool) -> None:
    output_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        if new_run and cfg.overwrite:
            for name in _other_run_outputs(cfg, store) + ["checkpoints", "logs"]:
                path = output_dir / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        (output_dir / "logs").mkdir(parents=True, exist_ok=True)
        store.remove_partial()
        remove_partial_snapshots(output_dir / SNAPSHOT_DIR)
        for leftover in output_dir.glob(f"{TMP_PREFIX}*"):  # an export killed before its rename
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()


def _truncate_metrics(accelerator, output_dir: Path, step: int) -> None:
    """Drops the lines logged after ``step`` (by a run killed after its last checkpoint), so a resumed
    run does not log those steps twice."""
    path = output_dir / "logs" / METRICS_FILE
    if accelerator.is_main_process and path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if _logged_step(line) is not None and _logged_step(line) <= step]
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(kept))
    accelerator.wait_for_everyone()


def _logged_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):  # a line cut by the kill
        return None


@dataclass
class _Parts:
    net: torch.nn.Module  # the plain module: EMA and sampling copies read it
    model: torch.nn.Module  # what trains: ``net`` prepared by accelerate (DDP / compiled), sharing its parameters
    optimizer: torch.optim.Optimizer
    loss_fn: Any
    scheduler: Any
    conditions: dict | None  # the condition spec the exported pipelines carry (None: unconditional)
    ema: EDMEma
    phema: PowerFunctionEMA | None  # post-hoc EMA profiles (--phema)


def _build_training(cfg: TrainConfig, accelerator, resolution: int, channels: int, conditions: dict | None) -> _Parts:
    from accelerate.utils import set_seed

    from pipelines.components.conditioning import label_dim

    if cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(cfg.seed)  # the same initial weights on every process
    net, loss_fn, scheduler = build_components(cfg, resolution, channels, label_dim(conditions) if conditions else 0)
    if cfg.gradient_checkpointing:
        net.enable_gradient_checkpointing()
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    net.train().requires_grad_(True)
    ema = EDMEma(net, cfg.ema_halflife_kimg, cfg.ema_rampup_ratio)
    phema = PowerFunctionEMA(net, cfg.phema_std) if cfg.phema else None
    # Dropout streams differ per process; resumed runs restore them from the checkpoint.
    torch.manual_seed(cfg.seed * accelerator.num_processes + accelerator.process_index)
    model, optimizer = accelerator.prepare(net, build_adam(net.parameters(), cfg))
    ema.to(accelerator.device)
    if phema is not None:
        phema.to(accelerator.device)
    return _Parts(net, model, optimizer, loss_fn, scheduler, conditions, ema, phema)


def _batches(cfg: TrainConfig, dataset, layout: BatchLayout, accelerator, start_step: int, labels=None):
    """This process's chunks from ``start_step`` on, as uint8 image batches (with ``labels``: (images, labels))."""
    from pipelines.data.conditions import LabelledFrames, collate_labelled

    if labels is not None:
        dataset = LabelledFrames(dataset, labels)
    sampler = RankBatchSampler(len(dataset), layout, accelerator.process_index, cfg.seed, start_step=start_step)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_images if labels is None else collate_labelled, num_workers=cfg.dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda", persistent_workers=cfg.dataloader_num_workers > 0,
        # Its own generator: creating the iterator must not draw from the (restored) global RNG.
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    return iter(loader)


def _run_info(cfg: TrainConfig, accelerator, layout: BatchLayout, dataset, net) -> dict[str, Any]:
    return dict(cfg.to_dict(), world_size=accelerator.num_processes, batch_per_round=layout.batch_per_round,
                accumulation_rounds=layout.rounds, resolution=dataset.resolution, channels=dataset.channels,
                num_parameters=sum(p.numel() for p in net.parameters()), dataset_size=len(dataset))


@dataclass
class _Progress:
    data: dict[str, Any]  # the dataset's resolution, channels and fingerprint, recorded in each checkpoint
    nonfinite_now: torch.Tensor  # this session's count of non-finite steps, on the device (read at log points)
    images_seen: int = 0
    step: int = 0
    nonfinite_before: int = 0  # from the checkpoint resumed

    def restore(self, state: dict[str, Any]) -> None:
        self.images_seen, self.step, self.nonfinite_before = state["images_seen"], state["step"], state["nonfinite_steps"]

    def nonfinite_total(self) -> int:
        return self.nonfinite_before + int(self.nonfinite_now.item())

    def state(self, cfg: TrainConfig, accelerator) -> dict[str, Any]:
        """What a checkpoint records besides the tensors."""
        return {"images_seen": self.images_seen, "step": self.step, "nonfinite_steps": self.nonfinite_total(),
                "world_size": accelerator.num_processes, **self.data, "config": cfg.to_dict()}


# --------------------------------------------------------------------------------------------------
# logging


class _Meter:
    """Statistics, the logged history (trackers, ``logs/metrics.jsonl``), the progress bar and images/s,
    which leaves out the time spent in checkpoints and snapshots."""

    def __init__(self, cfg: TrainConfig, accelerator, progress: _Progress):
        from tqdm.auto import tqdm

        self.cfg, self.accelerator, self.progress = cfg, accelerator, progress
        self.stats = TrainStats(accelerator.device)
        self.history: list[dict[str, float]] = []
        # Counted in images (integers, no float drift), shown in kimg; it ends where the run ends: at the
        # first whole batch past --duration_kimg.
        self.bar = tqdm(total=final_images(cfg, progress.images_seen), initial=progress.images_seen, unit_scale=1e-3,
                        bar_format="{l_bar}{bar}| {n:.3f}/{total:.3f} kimg [{elapsed}<{remaining}]{postfix}",
                        disable=not (cfg.progress_bar and accelerator.is_local_main_process))
        self._start_tick()

    def _start_tick(self) -> None:
        self.tick_time, self.tick_images, self.pause = time.perf_counter(), 0, 0.0

    def advance(self, images: int) -> None:
        self.tick_images += images
        self.bar.update(images)

    @contextlib.contextmanager
    def paused(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.pause += time.perf_counter() - start

    def log(self, lr: float) -> None:
        """Reduces the statistics over processes (every process calls it) and records them."""
        elapsed = time.perf_counter() - self.tick_time - self.pause
        logs = self.stats.summary(self.accelerator)
        logs.update({"train/lr": lr, "progress/kimg": self.progress.images_seen / 1000,
                     "train/images_per_second": self.tick_images / max(elapsed, 1e-9),
                     "train/nonfinite_grad_steps": self.progress.nonfinite_total()})
        step = self.progress.step
        self.accelerator.log(logs, step=step)
        self.history.append(dict(logs, step=step))
        if self.accelerator.is_main_process:  # a plain-text copy of the scalars, appended across resumes
            with open(Path(self.cfg.output_dir) / "logs" / METRICS_FILE, "a") as fh:
                fh.write(json.dumps(dict(logs, step=step)) + "\n")
        self.bar.set_postfix(loss=f"{logs['train/loss']:.4f}", refresh=False)
        self._start_tick()

    def close(self) -> None:
        self.bar.close()


# --------------------------------------------------------------------------------------------------
# snapshots and export


def _phema_storage_dtype(cfg: TrainConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.phema_bf16 else torch.float32


def _print_phema_disk_cost(cfg: TrainConfig, accelerator, phema: PowerFunctionEMA) -> None:
    every = max(int(round(cfg.phema_snapshot_kimg * 1000)), 1)
    count = cfg.duration_nimg // every + (cfg.duration_nimg % every > 0)
    size = phema.snapshot_bytes(_phema_storage_dtype(cfg))
    accelerator.print(f"post-hoc EMA: {len(phema.stds)} profiles (std {', '.join(f'{s:g}' for s in phema.stds)}), "
                      f"a snapshot every {cfg.phema_snapshot_kimg:g} kimg: {count} snapshots x {size / 2**20:.1f} MiB "
                      f"= {count * size / 2**20:.1f} MiB under {Path(cfg.output_dir) / SNAPSHOT_DIR}")


def _phema_snapshot(cfg: TrainConfig, accelerator, phema: PowerFunctionEMA, images_seen: int) -> None:
    if accelerator.is_main_process:
        phema.write_snapshots(Path(cfg.output_dir) / SNAPSHOT_DIR, images_seen, _phema_storage_dtype(cfg))
    accelerator.wait_for_everyone()


def _snapshot(cfg: TrainConfig, accelerator, parts: _Parts, progress: _Progress, save_pipeline: bool) -> None:
    """A sample grid of the EMA weights (main process); the others wait."""
    if accelerator.is_main_process:
        sampling_net = parts.ema.copy_to(new_sampling_net(parts.net, accelerator.device), 0)
        save_snapshot(accelerator, sampling_pipeline(sampling_net, parts.scheduler, parts.conditions), cfg.num_sample_images,
                      cfg.sample_steps, Path(cfg.output_dir), progress.images_seen, progress.step, save_pipeline)
    accelerator.wait_for_everyone()


def _export(cfg: TrainConfig, accelerator, parts: _Parts, run_info: dict[str, Any], progress: _Progress,
            hub_api) -> list[Path]:
    """The EMA pipelines with their cards (and the Hub upload), written by the main process."""
    pipeline_dirs: list[Path] = []
    if accelerator.is_main_process:
        run_info.update(images_seen=progress.images_seen, steps=progress.step,
                        nonfinite_grad_steps=progress.nonfinite_total())
        pipeline_dirs = export_pipelines(cfg, parts.ema, new_sampling_net(parts.net, accelerator.device),
                                         parts.scheduler, Path(cfg.output_dir), run_info, parts.conditions)
        if cfg.push_to_hub:
            from pipelines import hub

            hub.push_folder(pipeline_dirs[0], cfg.hub_model_id, private=cfg.hub_private, api=hub_api,
                            commit_message="Upload EchoDiff pipeline (train_unconditional.py)")
    accelerator.wait_for_everyone()
    return pipeline_dirs
