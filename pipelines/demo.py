"""The Quick-start demo (``python demo.py``): the whole EchoDiff job at CPU scale, in about 10 minutes.

Stages (each is reused when a previous run finished it, so re-running is cheap and an interrupted
run resumes): synthetic EchoNet-layout folder -> 64x64 frame dataset -> a small DDPM++ trained under
EDM (bf16 autocast where the CPU has native bf16) -> samples from the trained and from the untrained
network (same seeds, same sampler) -> FID and KID of both against the real frames, and the Optimal
FID of the real frames -> ``results/demo/`` with the sample grid, metrics JSON, loss curve and the
saved pipeline with its model card.

The Inception network runs at ~10-17 images/s on a 2-core CPU, so the demo scores a few hundred
images: its FIDs are biased upwards against FID-50k (compare them only with each other); KID is
unbiased at small sample sizes and is reported beside FID.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.errors import UserInputError
from pipelines.utils import atomic_write_json, jsonable, reset_accelerate_state

# Calibrated on the 2-core reference CPU (bf16 autocast): this network trains at ~50 img/s and samples
# at ~3.4 img/s with 18 Heun steps; Inception features run at ~17 img/s.
DEMO_NETWORK = {"model_channels": 16, "channel_mult": [1, 2, 4], "num_blocks": 1, "attn_resolutions": [16]}


@dataclass
class DemoConfig:
    """Every knob of the demo; the defaults are the Quick-start run, ``tiny_demo_config`` the test one."""

    out_dir: str = "results/demo"
    # data
    num_videos: int = 64
    video_frames: tuple[int, int] | None = None  # synthetic frame-count range (None: the generator's)
    resolution: int = 64
    frame_stride: int = 5
    split: str = "train"
    # model and training
    arch: str = "ddpmpp"
    precond: str = "edm"
    network_overrides: dict[str, Any] = field(default_factory=lambda: dict(DEMO_NETWORK))
    dropout: float = 0.0  # a few thousand images: no regularisation needed
    duration_kimg: float = 18.0
    batch_size: int = 32
    lr: float = 1e-3
    lr_rampup_kimg: float = 2.0
    ema_halflife_kimg: float = 1.0
    checkpointing_kimg: float = 3.0
    mixed_precision: str = "auto"  # "auto": bf16 where the CPU has native bf16, else no
    seed: int = 0
    # sampling and scoring
    num_generated: int = 256
    sampler_steps: int = 18
    sampling_precision: str = "auto"  # "auto": bf16 autocast where the CPU has native bf16 (keeps the FID), else fp32
    gen_batch_size: int = 64
    inception_batch_size: int = 32
    num_real: int | None = None  # None: every frame of the split
    grid_images: int = 64
    progress: bool = True
    # autoguidance (demo.py --autoguidance): a smaller guide trained on a fraction of the images, then a sweep
    autoguidance: bool = False
    guide_network_overrides: dict[str, Any] = field(default_factory=lambda: {**DEMO_NETWORK, "model_channels": 8})
    guide_fraction: float = 0.25
    ag_weights: tuple[float, ...] = (1.5, 2.0)  # the best weights of the measured sweep (docs/autoguidance.md)

    def __post_init__(self):
        positive = {"num_videos": self.num_videos, "resolution": self.resolution, "frame_stride": self.frame_stride,
                    "duration_kimg": self.duration_kimg, "batch_size": self.batch_size,
                    "num_generated": self.num_generated, "sampler_steps": self.sampler_steps,
                    "gen_batch_size": self.gen_batch_size, "inception_batch_size": self.inception_batch_size,
                    "grid_images": self.grid_images}
        for name, value in positive.items():
            if not value > 0:
                raise UserInputError(f"{name}: expected a positive value, got {value!r}")
        if self.num_generated < 2:
            raise UserInputError(f"num_generated: FID needs at least 2 generated images, got {self.num_generated}")
        if not 0 < self.guide_fraction <= 1:
            raise UserInputError(f"guide_fraction: expected a fraction in (0, 1] of the training, got {self.guide_fraction!r}")
        if self.mixed_precision not in ("auto", "no", "bf16"):
            raise UserInputError(f"mixed_precision: expected 'auto', 'no' or 'bf16', got {self.mixed_precision!r}")
        if self.sampling_precision not in ("auto", "fp32", "bf16"):
            raise UserInputError(f"sampling_precision: expected 'auto', 'fp32' or 'bf16', got {self.sampling_precision!r}")

    def sampling(self) -> dict[str, Any]:
        """The pipeline call arguments of the demo's sampling (the precision resolved for this machine)."""
        from pipelines.training.precision import resolve_sampling_precision

        return {"num_inference_steps": self.sampler_steps,
                "precision": resolve_sampling_precision(self.sampling_precision, "cpu")}


def tiny_demo_config(out_dir: str, **changes: Any) -> DemoConfig:
    """A seconds-long demo (16 px, a ~30k-parameter network, a handful of images): ``demo.py --tiny`` and the tests."""
    tiny = dict(out_dir=out_dir, num_videos=8, video_frames=(20, 26), resolution=16,
                network_overrides={"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1,
                                   "attn_resolutions": [8]},
                guide_network_overrides={"model_channels": 4, "channel_mult": [1, 2], "num_blocks": 1,
                                         "attn_resolutions": [8]},
                duration_kimg=0.032, batch_size=8, lr_rampup_kimg=0.0, checkpointing_kimg=0.016,
                mixed_precision="no", sampling_precision="fp32", num_generated=8, sampler_steps=2, gen_batch_size=8,
                grid_images=8)
    tiny.update(changes)
    return DemoConfig(**tiny)


class StageTimer:
    """Wall time per stage, printed as a summary; reused stages are marked as such."""

    def __init__(self):
        self.rows: list[dict[str, Any]] = []
        self.start = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        print(f"\n== {name}", flush=True)
        row = {"stage": name, "status": "ran"}
        t0 = time.perf_counter()
        yield row  # the body may set row["status"] = "reused"
        row["seconds"] = round(time.perf_counter() - t0, 2)
        self.rows.append(row)

    def summary(self) -> str:
        total = time.perf_counter() - self.start
        lines = ["stage timings:"]
        lines += [f"  {r['stage']:<56} {r['seconds']:8.1f} s  {r['status']}" for r in self.rows]
        lines.append(f"  {'total':<56} {total:8.1f} s")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# stages


def prepare_data(cfg: DemoConfig, out: Path, row: dict) -> Path:
    """The synthetic EchoNet-layout folder and its frame dataset (each reused when already complete)."""
    from pipelines.data.frame_builder import build_frame_dataset
    from pipelines.data.synthetic_echonet import write_synthetic_echonet

    echonet, frames = out / "data" / "echonet_synthetic", out / "data" / f"frames_{cfg.resolution}"
    reused = []
    filelist = echonet / "FileList.csv"
    if filelist.is_file() and len(filelist.read_text().splitlines()) - 1 == cfg.num_videos:
        reused.append("synthetic videos")
    else:  # FileList.csv is written last: without it (or with another size) the folder is redone
        write_synthetic_echonet(echonet, num_videos=cfg.num_videos, seed=cfg.seed, num_frames=cfg.video_frames,
                                overwrite=True)
        print(f"wrote {cfg.num_videos} synthetic EchoNet-layout videos to {echonet}")
    summary = frames / "build_summary.json"
    complete = summary.is_file() and json.loads(summary.read_text()).get("status") == "complete"
    if complete and reused:
        reused.append("frame dataset")
    else:  # resumes a partial build; rebuilds when the videos were rewritten
        build_frame_dataset(echonet, frames, resolution=cfg.resolution, frame_stride=cfg.frame_stride,
                            overwrite=complete, progress=cfg.progress, verbose=False)
    if len(reused) == 2:
        row["status"] = "reused"
    return frames


def train_config(cfg: DemoConfig, frames: Path, train_dir: Path):
    from pipelines.training import TrainConfig, resolve_mixed_precision

    precision = resolve_mixed_precision(cfg.mixed_precision, cpu=True)
    return TrainConfig(
        dataset=str(frames), output_dir=str(train_dir), arch=cfg.arch, precond=cfg.precond, split=cfg.split,
        dropout=cfg.dropout, network_overrides=dict(cfg.network_overrides), duration_kimg=cfg.duration_kimg,
        batch_size=cfg.batch_size, lr=cfg.lr, lr_rampup_kimg=cfg.lr_rampup_kimg,
        ema_halflife_kimg=(cfg.ema_halflife_kimg,), seed=cfg.seed, mixed_precision=precision, cpu=True,
        # Channels-last wins at paper size, but this small network trains ~10% faster NCHW (measured).
        channels_last=False,
        # The frames are in memory-mapped Arrow: worker processes would only compete for the 2 cores.
        dataloader_num_workers=0, checkpointing_kimg=cfg.checkpointing_kimg, checkpoints_total_limit=2,
        resume_from_checkpoint="latest", snapshot_kimg=cfg.duration_kimg, num_sample_images=16,
        sample_steps=cfg.sampler_steps, logging_steps=5, report_to="tensorboard", progress_bar=cfg.progress,
    )


TRAIN_DONE = "demo_training_done.json"


def model_identity(tcfg) -> dict:
    """The run's settings that decide the model it produces (the ones that only change how it is shown dropped)."""
    from pipelines.training.config import DISPLAY, fields_with_resume_role

    config = jsonable(tcfg.to_dict())
    return {k: v for k, v in config.items() if k not in fields_with_resume_role(DISPLAY)}


def identity_key(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def run_training(cfg: DemoConfig, frames: Path, train_dir: Path, row: dict) -> dict:
    """Train, resume or reuse the demo model; returns the finished run's summary.

    A finished run with the same model-defining settings is reused; otherwise ``train`` resumes from
    the latest checkpoint (a longer budget continues the run; an incompatible model is refused by
    ``train`` with an error naming the setting).
    """
    from pipelines.training import train

    tcfg = train_config(cfg, frames, train_dir)
    done = train_dir / TRAIN_DONE
    wanted = model_identity(tcfg)
    if done.is_file():
        info = json.loads(done.read_text())
        if info.get("identity") == wanted and (train_dir / "pipeline" / "model_index.json").is_file():
            row["status"] = "reused"
            return info
        done.unlink()
    print(f"training {cfg.arch.upper()} ({tcfg.network_overrides}) under {cfg.precond.upper()} for "
          f"{cfg.duration_kimg:g} kimg, batch {cfg.batch_size}, mixed precision {tcfg.mixed_precision}")
    reset_accelerate_state()
    t0 = time.perf_counter()
    result = train(tcfg)
    seconds = time.perf_counter() - t0
    reset_accelerate_state()
    info = {"identity": wanted, "config": jsonable(tcfg.to_dict()), "images_seen": result.images_seen,
            "steps": result.steps, "seconds_this_session": round(seconds, 1), "pipeline": str(result.pipeline_dirs[0])}
    atomic_write_json(done, info)
    return info


def loss_history(train_dir: Path) -> list[dict]:
    """The scalars ``train()`` appends to ``logs/metrics.jsonl`` (one row per logging step, across resumes)."""
    path = Path(train_dir) / "logs" / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected the training log written by pipelines.training.train")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:  # a run killed mid-write leaves a partial last line
            raise ValueError(f"{path} line {number} is not a JSON record ({err})") from err
    by_step = {int(r["step"]): r for r in rows}  # a resumed run re-logs steps after its checkpoint: keep the last
    return [by_step[s] for s in sorted(by_step)]


def plot_loss_curve(history: list[dict], path: Path, title: str = "training loss") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        raise ValueError("the training log is empty: nothing to plot")
    kimg = [r["progress/kimg"] for r in history]
    loss = [r["train/loss"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(kimg, loss, lw=1, alpha=0.5, label="loss (per logging interval)")
    if len(loss) >= 5:
        k = max(len(loss) // 10, 2)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(kimg[k - 1:], smooth, lw=2, label=f"moving average ({k})")
    ax.set_xlabel("images seen (kimg)")
    ax.set_ylabel("EDM weighted denoising loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def untrained_pipeline(cfg: DemoConfig, channels: int):
    """The same network at its initialisation (seeded like the training run) with the same sampler."""
    from pipelines.components.pipeline_echodiff import EchoDiffPipeline
    from pipelines.components.scheduling_edm_heun import EDMHeunScheduler
    from pipelines.networks import build_network

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = build_network(cfg.arch, resolution=cfg.resolution, channels=channels, dropout=cfg.dropout,
                            **cfg.network_overrides)
    pipe = EchoDiffPipeline(unet=net.eval(), scheduler=EDMHeunScheduler(preconditioning=cfg.precond))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def export_pipeline(train_dir: Path, target: Path, metrics: dict[str, float], evaluation: dict,
                    sample_grid: Path | None = None) -> Path:
    """Copy of the trained pipeline whose model card carries the demo's metrics (``evaluation``: how many
    generated images against which real set), a sample grid and the training section; not pushed, so the
    card's usage example loads the folder."""
    from pipelines import hub
    from pipelines.training.export import RUN_INFO_FILE, training_card_section

    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(train_dir / "pipeline", target)
    run_info = json.loads((train_dir / RUN_INFO_FILE).read_text())
    hub.write_model_card(target, None, metrics=metrics, training_dataset=run_info.get("dataset"),
                         evaluation=evaluation, sample_grid=sample_grid, sections=[training_card_section(run_info)])
    return target


# --------------------------------------------------------------------------------------------------
# the demo


def run_demo(cfg: DemoConfig | None = None, **changes: Any) -> dict:
    """Runs (or resumes) the demo; returns the metrics dict also written to ``<out_dir>/metrics.json``."""
    from pipelines.data.frame_reader import load_frames
    from pipelines.hub import load_pipeline

    cfg = dataclasses.replace(cfg, **changes) if cfg is not None else DemoConfig(**changes)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timer = StageTimer()
    seeds = list(range(cfg.num_generated))

    with timer.stage("data: synthetic videos + frame dataset") as row:
        frames_dir = prepare_data(cfg, out, row)
        frames = load_frames(frames_dir, cfg.split)
        print(f"{len(frames)} {cfg.split} frames of {frames.resolution}x{frames.resolution} in {frames_dir}")
    train_dir = out / "train"
    with timer.stage("training") as row:
        train_info = run_training(cfg, frames_dir, train_dir, row)
    with timer.stage("loss curve"):
        loss_png = plot_loss_curve(loss_history(train_dir), out / "loss_curve.png",
                                   f"{cfg.arch.upper()}-{cfg.precond.upper()} demo, batch {cfg.batch_size}")

    pipes = {"trained": load_pipeline(train_dir / "pipeline"), "untrained": untrained_pipeline(cfg, frames.channels)}
    sample_dirs = sample_folders(cfg, out, train_info)
    sampling = pipes["trained"].sampler_description(**cfg.sampling())
    generate_samples(cfg, pipes, sample_dirs, seeds, timer)
    scores, optimal = score_samples(cfg, pipes, sample_dirs, seeds, frames, out / "cache", timer)
    with timer.stage("sample grids, pipeline + model card"):
        paths = write_grids_and_pipeline(cfg, out, frames, sample_dirs, seeds[:cfg.grid_images], scores, train_dir)
    paths.update(loss_curve=str(loss_png), training_run=str(train_dir), tensorboard_logs=str(train_dir / "logs"),
                 frames=str(frames_dir), samples={k: str(v) for k, v in sample_dirs.items()})

    n_gen, n_real = scores["trained"]["num_generated"], scores["trained"]["num_real"]
    if cfg.autoguidance:
        paths["autoguidance"] = str(out / "autoguidance")
        scores["autoguidance"] = run_autoguidance(cfg, out, frames_dir, frames, pipes["trained"], seeds, timer)
    metrics = {
        "trained": scores["trained"], "untrained": scores["untrained"], "optimal_fid": optimal,
        **({"autoguidance": scores["autoguidance"]} if cfg.autoguidance else {}),
        "protocol": {"num_generated": n_gen, "num_real": n_real, "split": cfg.split, "sampler_steps": cfg.sampler_steps,
                     "sampler": sampling["sampler"], "nfe": sampling["nfe"], "precision": sampling["precision"],
                     "resolution": cfg.resolution,
                     "note": "small-sample FID (biased upwards vs FID-50k): compare only within this file; "
                             "KID is unbiased"},
        "training": {k: train_info[k] for k in ("images_seen", "steps")} | {
            "arch": cfg.arch, "precond": cfg.precond, "network_overrides": cfg.network_overrides,
            "num_parameters": int(sum(p.numel() for p in pipes["trained"].unet.parameters())),
            "mixed_precision": train_info["config"]["mixed_precision"], "batch_size": cfg.batch_size},
        "config": dataclasses.asdict(cfg), "timings": timer.rows, "paths": paths,
    }
    metrics_path = atomic_write_json(out / "metrics.json", metrics)
    print(report(metrics, metrics_path))
    print(timer.summary())
    metrics["timings_total_s"] = round(time.perf_counter() - timer.start, 1)
    atomic_write_json(metrics_path, metrics)
    return metrics


def run_autoguidance(cfg: DemoConfig, out: Path, frames_dir: Path, frames, pipe, seeds: list[int],
                     timer: StageTimer) -> list[dict]:
    """Train the guide (the demo network with ``guide_network_overrides``, ``guide_fraction`` of its images and
    EMA), then score unguided vs autoguidance at ``ag_weights`` on the demo's seeds, steps and real frames."""
    from pipelines.evaluation.fid import InceptionDetector
    from pipelines.evaluation.guidance_sweep import guidance_grid, guidance_sweep
    from pipelines.hub import attach_guide

    guide_cfg = dataclasses.replace(cfg, network_overrides=dict(cfg.guide_network_overrides),
                                    duration_kimg=cfg.duration_kimg * cfg.guide_fraction,
                                    ema_halflife_kimg=cfg.ema_halflife_kimg * cfg.guide_fraction)
    guide_dir = out / "guide"
    with timer.stage(f"training the guide ({guide_cfg.duration_kimg:g} kimg)") as row:
        run_training(guide_cfg, frames_dir, guide_dir, row)
    attach_guide(pipe, guide_dir / "pipeline")
    sampling = cfg.sampling()  # the demo's own steps and precision: its unguided samples are the sweep's baseline
    with timer.stage(f"autoguidance sweep (w = {', '.join(f'{w:g}' for w in cfg.ag_weights)})"):
        rows = guidance_sweep(pipe, frames, out / "autoguidance", guidance_grid(ag_weights=cfg.ag_weights), seeds,
                              gen_batch_size=cfg.gen_batch_size,
                              run_info={"model": "trained", "guide": str(guide_dir / "pipeline")},
                              progress=cfg.progress, detector=InceptionDetector(), num_real=cfg.num_real,
                              cache_dir=out / "cache", batch_size=cfg.inception_batch_size,
                              num_inference_steps=sampling.pop("num_inference_steps"), sampler_kwargs=sampling)
    return rows


def sample_folders(cfg: DemoConfig, out: Path, train_info: dict) -> dict[str, Path]:
    """Shard folders named after what made the samples, so another model never reuses them."""
    untrained = {k: train_info["identity"][k] for k in ("arch", "precond", "network_overrides", "seed", "dropout")}
    precision = cfg.sampling()["precision"]  # its samples differ from fp32's in the last bits: own folder
    return {"trained": out / "samples" / f"trained-{identity_key([train_info['identity'], train_info['images_seen']])}"
                                         f"-{precision}",
            "untrained": out / "samples" / f"untrained-{identity_key(untrained | {'resolution': cfg.resolution})}"
                                           f"-{precision}"}


def generate_samples(cfg: DemoConfig, pipes: dict, sample_dirs: dict[str, Path], seeds: list[int],
                     timer: StageTimer) -> None:
    from pipelines.evaluation.generation import finished_seeds, generate_images

    for name, pipe in pipes.items():
        with timer.stage(f"sampling {name} model ({cfg.num_generated} images, {cfg.sampler_steps} steps)") as row:
            folder = sample_dirs[name]
            if folder.is_dir() and set(seeds) <= finished_seeds(folder):
                row["status"] = "reused"
            generate_images(pipe, folder, seeds, batch_size=cfg.gen_batch_size, run_info={"model": name},
                            progress=cfg.progress, **cfg.sampling())


def score_samples(cfg: DemoConfig, pipes: dict, sample_dirs: dict[str, Path], seeds: list[int], frames,
                  cache: Path, timer: StageTimer) -> tuple[dict, dict]:
    """FID + KID of both models' samples and the Optimal FID of the real frames."""
    from pipelines.evaluation import protocol as ev
    from pipelines.evaluation.fid import InceptionDetector

    detector = InceptionDetector()
    print(f"\nNote: the Inception network runs at only ~10-17 images/s on a 2-core CPU, so this demo scores "
          f"{cfg.num_generated} generated images against {cfg.num_real or len(frames)} real frames instead of "
          "50,000: these FIDs are biased upwards and comparable only with each other; KID (unbiased) is "
          "reported beside them.")
    scores = {}
    for name, pipe in pipes.items():
        with timer.stage(f"FID + KID of the {name} model"):
            scores[name] = ev.fid_of_samples(pipe, sample_dirs[name], seeds, frames, num_real=cfg.num_real,
                                             cache_dir=cache, detector=detector, batch_size=cfg.inception_batch_size,
                                             gen_batch_size=cfg.gen_batch_size, run_info={"model": name},
                                             progress=cfg.progress, **cfg.sampling())
            scores[name].pop("reference", None)
    with timer.stage("Optimal FID of the real frames"):
        optimal = ev.optimal_fid(frames, seed=cfg.seed, detector=detector, cache_dir=cache,
                                 batch_size=cfg.inception_batch_size, progress=cfg.progress)
    return scores, optimal


def write_grids_and_pipeline(cfg: DemoConfig, out: Path, frames, sample_dirs: dict[str, Path], grid_seeds: list[int],
                             scores: dict, train_dir: Path) -> dict[str, str]:
    """The sample grids (trained, untrained, real) and the published pipeline folder; returns their paths."""
    from pipelines.evaluation.generation import load_images
    from pipelines.utils import save_image_grid

    grid = save_image_grid(load_images(sample_dirs["trained"], seeds=grid_seeds), out / "samples_grid.png", nrow=8)
    untrained_grid = save_image_grid(load_images(sample_dirs["untrained"], seeds=grid_seeds),
                                     out / "untrained_grid.png", nrow=8)
    real_idx = np.linspace(0, len(frames) - 1, num=min(cfg.grid_images, len(frames))).round().astype(int)
    real_grid = save_image_grid(frames.images_uint8(real_idx), out / "real_grid.png", nrow=8)
    t = scores["trained"]
    n_gen, n_real = t["num_generated"], t["num_real"]
    setting = f"{n_gen} generated vs {n_real} real, {t['sampler']} {t['nfe']} NFE, {t['precision']}, demo"
    card_metrics = {f"FID ({setting})": round(t["fid"], 3), f"KID ({setting})": round(t["kid"], 5)}
    evaluation = {"num_generated": n_gen, "reference": f"{n_real} real frames ({cfg.split} split of the demo's "
                  "synthetic frame dataset)"}
    pipeline_dir = export_pipeline(train_dir, out / "pipeline", card_metrics, evaluation, sample_grid=grid)
    return {"samples_grid": str(grid), "untrained_grid": str(untrained_grid), "real_grid": str(real_grid),
            "pipeline": str(pipeline_dir), "model_card": str(pipeline_dir / "README.md")}


def report(metrics: dict, metrics_path: Path) -> str:
    t, u, o = metrics["trained"], metrics["untrained"], metrics["optimal_fid"]
    p = metrics["protocol"]
    better = t["fid"] < u["fid"] and t["kid"] < u["kid"]
    lines = [
        "",
        f"== results ({p['num_generated']} generated images vs {p['num_real']} real {p['resolution']}x"
        f"{p['resolution']} frames, {p['sampler_steps']} {p['sampler']} steps = {p['nfe']} NFE, {p['precision']})",
        f"  trained model:    FID {t['fid']:9.2f}   KID {t['kid']:.4f} +- {t['kid_std']:.4f}",
        f"  untrained model:  FID {u['fid']:9.2f}   KID {u['kid']:.4f} +- {u['kid_std']:.4f}",
        f"  Optimal FID of the real frames (two halves): patient-level {o['patient_level']['fid']:.2f} "
        f"({o['patient_level']['num_a']} vs {o['patient_level']['num_b']} frames), frame-level "
        f"{o['frame_level']['fid']:.2f}",
        "  " + ("the trained model is clearly better than the untrained one"
                if better and t["fid"] < 0.75 * u["fid"] else
                "WARNING: the trained model is not clearly better than the untrained one"),
        "  FIDs on a few hundred images are biased upwards against FID-50k; compare them only with each other.",
        "",
        "outputs:",
    ]
    for row in metrics.get("autoguidance", []):
        label = "unguided (sweep)" if row["guidance"] == "unguided" else f"autoguidance w={row['ag_weight']:g}"
        lines.insert(-3, f"  {label:<17} FID {row['fid']:9.2f}   KID {row['kid']:.4f} +- {row['kid_std']:.4f}"
                         f"   {row['seconds_per_image']:.3f} s/image")
    names = {"samples_grid": "sample grid (trained)", "untrained_grid": "sample grid (untrained)",
             "real_grid": "real frames grid", "loss_curve": "loss curve", "pipeline": "saved pipeline",
             "model_card": "model card", "tensorboard_logs": "tensorboard logs", "autoguidance": "autoguidance sweep"}
    lines += [f"  {label:<24} {metrics['paths'][key]}" for key, label in names.items() if key in metrics["paths"]]
    lines.append(f"  {'metrics JSON':<24} {metrics_path}")
    return "\n".join(lines)

