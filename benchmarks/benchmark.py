#!/usr/bin/env python3
"""EchoDiff speed and memory suite: one table, one JSON (issue 10).

    flock /tmp/echodiff-cpu.lock python benchmarks/benchmark.py --json bench.json        # everything, paper size
    python benchmarks/benchmark.py --only train --arch ddpmpp --precision bf16            # one cell
    python benchmarks/benchmark.py --quick                                                # tiny nets, CI smoke test

Rows (``--only``, repeatable):
  ceiling    matmul ceiling, 2048x2048, fp32 and bf16 (GFLOP/s)
  train      per network x precision: EDM loss forward+backward + Adam + EMA (``pipelines.training.step.train_step``),
             img/s, achieved GFLOP/s and share of the ceiling, peak RSS (fresh subprocess per cell)
  sample     per network x precision: the EDM denoiser D(x; sigma) forward, img*NFE/s, GFLOP/s, share
  optim      Adam step (for-loop / foreach / fused) and EMA update (fp32 / bf16 shadows) per network
  dg         Discriminator Guidance sampling overhead (w2 = 0 and w2 > 0) over plain sampling
  losscurve  bf16 vs fp32: the same 200-step run on a small DDPM++, loss gap and non-finite steps
  inception  FID Inception features/s (default detector and the shipped TorchScript; max relative error)
  data       dataset build frames/s, DataLoader img/s (FrameDataset, 0 and 2 workers)

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on fake tensors (no compute). Timings
are medians of ``--reps`` runs after ``--warmup`` runs. Train and sample timings of a network run in separate
fresh processes (a sampling process after training steps reads 25-40% fast). ``--edm_checkout PATH`` (a
checkout of github.com/NVlabs/edm, kept outside this repository) measures NVlabs EDM's own networks, loss and
Adam in the same run, fp32, each in a fresh process, and the "vs EDM" column divides by those; without a
checkout there is no ratio (figures from another machine would mislead).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere without installing
sys.path.insert(0, str(REPO / "benchmarks"))  # the other bench scripts, reused by import

from pipelines.networks import ARCHITECTURES  # noqa: E402

ROWS = ("ceiling", "train", "sample", "optim", "dg", "losscurve", "inception", "data")
ARCHS = tuple(ARCHITECTURES)
# The default run: the paper's three and the EDM2 presets that fit its budget (M..XL: pass --arch).
DEFAULT_ARCHS = ("adm", "ddpmpp", "ncsnpp", "edm2-xs", "edm2-s")
PRECISIONS = ("fp32", "bf16")
# NVlabs EDM's train.py network settings per --arch (facts, not code: its classes come from --edm_checkout).
EDM_NETWORKS = {
    "ddpmpp": dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                   decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    "ncsnpp": dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2]),
    "adm": dict(model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4]),
}


# ----------------------------------------------------------------------------------------------------
# helpers


def median_time(fn, warmup: int, reps: int) -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` over ``reps`` calls after ``warmup`` calls (and all timed values)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def sdpa_context(backend: str):
    """SDPA backend choice (a fresh context per use: sdpa_kernel's cannot be re-entered); CPU has the
    math and the flash (fused, tiled) kernels."""
    if backend == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION}[backend])


def network_overrides(arch: str, quick: bool, resolution: int) -> dict:
    from pipelines.networks import tiny_config

    return tiny_config(arch, resolution) if quick else {"resolution": resolution}


def count_flops(arch: str, channels: int, resolution: int, quick: bool, batch: int = 2) -> dict:
    """GFLOP per image of the denoiser forward and of forward+backward, counted on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from pipelines.components.preconditioning import EDMPreconditioning
    from pipelines.networks import build_network

    pre = EDMPreconditioning()
    with FakeTensorMode():  # shapes only: paper-size counts cost no compute and no memory
        net = build_network(arch, channels=channels, **network_overrides(arch, quick, resolution))
        x, sigma = torch.randn(batch, channels, resolution, resolution), torch.ones(batch)
        with FlopCounterMode(display=False) as forward:
            pre.denoise(net, x, sigma)
        with FlopCounterMode(display=False) as train:
            pre.denoise(net, x, sigma).square().sum().backward()
    return {"forward_gflop_per_img": forward.get_total_flops() / batch / 1e9,
            "train_gflop_per_img": train.get_total_flops() / batch / 1e9}


def matmul_ceiling(size: int, warmup: int, reps: int) -> dict:
    """GFLOP/s of a size x size matmul, fp32 and bf16 (the attainable peak for dense work here)."""
    out = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        seconds, _ = median_time(lambda a=a, b=b: a @ b, warmup, max(reps, 3))
        out[f"{precision}_gflop_s"] = 2 * size**3 / seconds / 1e9
    return out


# ----------------------------------------------------------------------------------------------------
# network cells (run in a fresh subprocess each, so the peak RSS belongs to one configuration)


def network_cell(spec: dict) -> dict:
    """Train and/or sample timing of one (arch, precision, options) configuration."""
    from accelerate import Accelerator

    from pipelines.ema import EDMEma
    from pipelines.training import TrainConfig
    from pipelines.training.data_order import batch_layout
    from pipelines.training.stats import TrainStats
    from pipelines.training.step import build_components, train_step
    from pipelines.utils import reset_accelerate_state

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    arch, precision, batch, channels, res = spec["arch"], spec["precision"], spec["batch"], spec["channels"], spec["resolution"]
    overrides = network_overrides(arch, spec["quick"], res)
    overrides.pop("resolution", None)
    cfg = TrainConfig(dataset="-", output_dir="-", arch=arch, batch_size=batch,
                      mixed_precision="bf16" if precision == "bf16" else "no", channels_last=spec["channels_last"],
                      network_overrides=overrides)
    result = {"arch": arch, "precision": precision, "batch": batch, "channels": channels, "resolution": res,
              "threads": spec["threads"], "options": {k: spec[k] for k in OPTION_KEYS}}
    result.update(count_flops(arch, channels, res, spec["quick"]))
    rss_before = peak_rss_gib()
    reset_accelerate_state()  # in-process (--no_isolate) cells differ in precision
    accelerator = Accelerator(cpu=True, mixed_precision=cfg.mixed_precision)
    net, loss_fn, _ = build_components(cfg, resolution=res, channels=channels)
    result["params_M"] = sum(p.numel() for p in net.parameters()) / 1e6
    if spec["grad_ckpt"]:
        net.enable_gradient_checkpointing()
    if spec["channels_last"]:
        net = net.to(memory_format=torch.channels_last)

    if spec["train"]:
        net.train().requires_grad_(True)
        ema = EDMEma(net, cfg.ema_halflife_kimg, cfg.ema_rampup_ratio)
        optim_kwargs = {"foreach": {"foreach": True}, "fused": {"fused": True}, "forloop": {"foreach": False}}
        optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                     **optim_kwargs[spec["optimizer"]])
        model, optimizer = accelerator.prepare(net, optimizer)
        if spec["compile"]:
            model = torch.compile(model)
        layout = batch_layout(batch, 1, None)
        stats = TrainStats(accelerator.device)
        images = torch.randint(0, 256, (batch, channels, res, res), dtype=torch.uint8)
        step = [0]

        def train_once():
            seen = 10**7 + step[0] * batch  # past the lr warm-up: real updates
            step[0] += 1
            with sdpa_context(spec["sdpa"]):
                nonfinite = train_step(accelerator, model, optimizer, loss_fn, [(images, range(seen, seen + batch))],
                                       cfg, layout, stats, seen)
            ema.update(net, batch, seen)
            if bool(nonfinite):
                raise FloatingPointError(f"{arch} {precision}: non-finite gradient in the benchmark step")

        first = time.perf_counter()
        train_once()  # the first step holds compile time (when compiling) and allocator warm-up
        first = time.perf_counter() - first
        seconds, times = median_time(train_once, spec["warmup"] - 1 if spec["warmup"] > 0 else 0, spec["reps"])
        result.update(train_step_s=seconds, train_step_all_s=[first] + times, train_img_s=batch / seconds,
                      train_first_step_s=first,
                      train_gflop_s=result["train_gflop_per_img"] * batch / seconds,
                      peak_rss_gib=peak_rss_gib(), rss_isolated=spec["isolated"] and rss_before < 1.0,
                      train_loss=stats.summary(accelerator)["train/loss"])
        del optimizer, model, ema

    if spec["sample"]:
        from pipelines.components.preconditioning import EDMPreconditioning

        pre = EDMPreconditioning()
        sample_net = net.eval()
        if spec["compile"] and not spec["train"]:
            sample_net = torch.compile(sample_net)
        x = torch.randn(batch, channels, res, res)
        if spec["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        sigma = torch.full((batch,), 2.0)

        def sample_once():
            with torch.no_grad(), autocast(precision), sdpa_context(spec["sdpa"]):
                out = pre.denoise(sample_net, x, sigma)
            if not torch.isfinite(out).all():
                raise FloatingPointError(f"{arch} {precision}: non-finite denoiser output")

        seconds, times = median_time(sample_once, max(spec["warmup"], 1), spec["reps"])
        result.update(sample_nfe_s=seconds, sample_all_s=times, sample_img_nfe_s=batch / seconds,
                      sample_gflop_s=result["forward_gflop_per_img"] * batch / seconds)
        if not spec["train"]:
            result.update(peak_rss_gib=peak_rss_gib(), rss_isolated=spec["isolated"] and rss_before < 1.0)
    return result


OPTION_KEYS = ("channels_last", "compile", "grad_ckpt", "optimizer", "sdpa")


def edm_reference_cell(checkout: str, arch: str, part: str, batch: int, channels: int, resolution: int,
                       threads: int, warmup: int, reps: int, dropout: float = 0.05) -> dict:
    """NVlabs EDM's own EDMPrecond network: its EDMLoss + Adam step ("train") or a D(x; sigma) forward
    ("sample"), fp32 NCHW as its code runs on a CPU. Imports the checkout's modules; nothing is copied."""
    sys.path.insert(0, str(Path(checkout).resolve()))
    from training.loss import EDMLoss
    from training.networks import EDMPrecond

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=resolution, img_channels=channels, label_dim=0, dropout=dropout,
                     **EDM_NETWORKS[arch])
    result = {"arch": arch, "part": part, "params_M": sum(p.numel() for p in net.parameters()) / 1e6,
              "checkout": str(checkout)}
    images = torch.rand(batch, channels, resolution, resolution) * 2 - 1
    if part == "train":
        net.train().requires_grad_(True)
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
        loss_fn = EDMLoss()

        def once():
            optimizer.zero_grad(set_to_none=True)
            loss_fn(net=net, images=images).sum().mul(1 / batch).backward()
            optimizer.step()

        seconds, times = median_time(once, max(warmup, 1), reps)
        result.update(train_img_s=batch / seconds, train_all_s=times)
    else:
        net.eval()
        sigma = torch.full((batch,), 2.0)

        def once():
            with torch.no_grad():
                net(images, sigma)

        seconds, times = median_time(once, max(warmup, 1), reps)
        result.update(sample_img_nfe_s=batch / seconds, sample_all_s=times)
    result["peak_rss_gib"] = peak_rss_gib()
    return result


# ----------------------------------------------------------------------------------------------------
# optimiser and EMA step costs


def optim_cell(arch: str, channels: int, resolution: int, quick: bool, threads: int, warmup: int, reps: int) -> dict:
    """Adam step (for-loop / foreach / fused) and EMA lerp (fp32 / bf16 shadows) on the network's parameters."""
    from pipelines.networks import build_network

    torch.set_num_threads(threads)
    overrides = network_overrides(arch, quick, resolution)
    overrides.pop("resolution", None)
    net = build_network(arch, resolution=resolution, channels=channels, **overrides)
    params = [p for p in net.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    out = {"arch": arch, "params_M": sum(p.numel() for p in params) / 1e6}
    for name, kwargs in (("forloop", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        optimizer = torch.optim.Adam(params, lr=1e-4, **kwargs)
        out[f"adam_{name}_s"], _ = median_time(optimizer.step, max(warmup, 1), reps)
        del optimizer
    with torch.no_grad():
        current = [p.detach() for p in params]
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            shadow = [p.detach().to(dtype, copy=True) for p in params]

            def lerp(shadow=shadow, dtype=dtype):
                source = current if dtype == torch.float32 else [c.to(dtype) for c in current]
                torch._foreach_lerp_(shadow, source, 1e-3)

            out[f"ema_{name}_s"], _ = median_time(lerp, max(warmup, 1), reps)
    return out


# ----------------------------------------------------------------------------------------------------
# Discriminator Guidance overhead


def dg_cell(arch: str, precision: str, channels: int, resolution: int, quick: bool, threads: int, batch: int,
            warmup: int, reps: int, steps: int) -> dict:
    """Sampling time with DG (w2 = 0, w2 > 0) over plain sampling, same network, batch and steps."""
    from pipelines.components.pipeline_echodiff import EchoDiffPipeline
    from pipelines.components.scheduling_edm_heun import EDMHeunScheduler
    from pipelines.networks import build_network
    from pipelines.training.discriminator import build_discriminator

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    overrides = network_overrides(arch, quick, resolution)
    overrides.pop("resolution", None)
    net = build_network(arch, resolution=resolution, channels=channels, **overrides).eval().requires_grad_(False)
    disc = build_discriminator("adm", resolution=resolution, channels=channels, tiny=quick).eval().requires_grad_(False)
    pipe = EchoDiffPipeline(unet=net, scheduler=EDMHeunScheduler())
    pipe.set_progress_bar_config(disable=True)
    seeds = list(range(batch))
    nfe = 2 * steps - 1
    out = {"arch": arch, "precision": precision, "batch": batch, "steps": steps, "nfe": nfe,
           "discriminator_params_M": sum(p.numel() for p in disc.parameters()) / 1e6}

    def run(**kw):
        with autocast(precision):
            images = pipe(seeds=seeds, num_inference_steps=steps, output_type="latent", **kw).images
        if not torch.isfinite(images).all():
            raise FloatingPointError("DG benchmark: non-finite samples")

    out["plain_s"], _ = median_time(run, warmup, reps)
    guided = dict(discriminator=disc, dg_sigma_min=0.0)  # guide every step: the upper bound of the cost
    for name, w2 in (("w2_0", 0.0), ("w2_pos", 1.0)):
        seconds, _ = median_time(lambda w2=w2: run(dg_weight_first_order=1.0, dg_weight_second_order=w2, **guided),
                                 warmup, reps)
        out[f"dg_{name}_s"], out[f"dg_{name}_overhead"] = seconds, seconds / out["plain_s"]
    return out


# ----------------------------------------------------------------------------------------------------
# bf16 vs fp32 loss curves


LOSS_CURVE_NET = dict(model_channels=32, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(16,))


def loss_curve_cell(steps: int, quick: bool, threads: int, batch: int) -> dict:
    """The same training run (weights, data order, noise) in fp32 and in bf16 autocast: per-step losses.

    A small-but-not-tiny DDPM++ (32x32, 1 channel, ~2M parameters; tiny with ``quick``) on synthetic echo
    frames, lr 1e-3 (EDM's, past the warm-up), through ``pipelines.training.step.train_step``.
    """
    from accelerate import Accelerator

    from pipelines.data.synthetic_echonet import synthetic_frames
    from pipelines.networks import tiny_config
    from pipelines.training import TrainConfig
    from pipelines.training.data_order import batch_layout
    from pipelines.training.stats import TrainStats
    from pipelines.training.step import build_components, train_step
    from pipelines.utils import reset_accelerate_state

    torch.set_num_threads(threads)
    res = 16 if quick else 32
    overrides = tiny_config("ddpmpp", res) if quick else dict(LOSS_CURVE_NET)
    overrides.pop("resolution", None)
    frames = torch.from_numpy(synthetic_frames(max(8 * batch, 64), seed=0, resolution=res))
    curves, nonfinite = {}, {}
    for precision in PRECISIONS:
        cfg = TrainConfig(dataset="-", output_dir="-", arch="ddpmpp", batch_size=batch, network_overrides=overrides,
                          mixed_precision="bf16" if precision == "bf16" else "no")
        reset_accelerate_state()
        accelerator = Accelerator(cpu=True, mixed_precision=cfg.mixed_precision)
        torch.manual_seed(0)  # identical initial weights and dropout streams in both runs
        net, loss_fn, _ = build_components(cfg, resolution=res, channels=1)
        optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
        model, optimizer = accelerator.prepare(net.train(), optimizer)
        layout, stats = batch_layout(batch, 1, None), TrainStats(accelerator.device)
        curves[precision], nonfinite[precision] = [], 0
        for step in range(steps):
            seen = 10**7 + step * batch
            index = torch.arange(step * batch, (step + 1) * batch) % len(frames)
            nonfinite[precision] += int(train_step(accelerator, model, optimizer, loss_fn,
                                                   [(frames[index], range(seen, seen + batch))], cfg, layout, stats, seen))
            curves[precision].append(stats.summary(accelerator)["train/loss"])
    tail = max(1, steps // 4)
    mean_tail = {p: statistics.fmean(curves[p][-tail:]) for p in PRECISIONS}
    per_step = [abs(b - f) / abs(f) for f, b in zip(curves["fp32"], curves["bf16"]) if f]
    all_finite = all(math.isfinite(v) for p in PRECISIONS for v in curves[p])
    return {"steps": steps, "batch": batch, "resolution": res,
            "params_M": sum(p.numel() for p in net.parameters()) / 1e6,
            "fp32_tail_mean": mean_tail["fp32"], "bf16_tail_mean": mean_tail["bf16"], "tail_steps": tail,
            "tail_rel_gap": abs(mean_tail["bf16"] - mean_tail["fp32"]) / mean_tail["fp32"],
            "per_step_median_rel_gap": statistics.median(per_step) if per_step else float("nan"),
            "nonfinite_steps_fp32": nonfinite["fp32"], "nonfinite_steps_bf16": nonfinite["bf16"],
            "all_losses_finite": all_finite, "curves": curves}


# ----------------------------------------------------------------------------------------------------
# Inception and data


def inception_cell(images: int, warmup: int, reps: int, threads: int) -> dict:
    from bench_inception import relative_error, time_detector

    from pipelines.data.synthetic_echonet import synthetic_frames
    from pipelines.evaluation.fid import InceptionDetector

    torch.set_num_threads(threads)
    frames = torch.from_numpy(synthetic_frames(images, seed=0, resolution=64))
    plain = InceptionDetector(backend="torchscript", channels_last=False, micro_batch=0)
    reference, plain_speed = time_detector(plain, frames, warmup, reps)
    default = InceptionDetector()
    features, default_speed = time_detector(default, frames, warmup, reps)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:  # the 299x299 network's FLOPs, for the share of the ceiling
        default(frames[:1])
    gflop_per_img = counter.get_total_flops() / 1e9
    return {"images": images, "torchscript_img_s": plain_speed, "default_img_s": default_speed,
            "default_max_rel_err": relative_error(features, reference), "default_backend": default.backend,
            "gflop_per_img": gflop_per_img, "default_gflop_s": gflop_per_img * default_speed}


def data_cell(work: Path, num_videos: int, loader_images: int, workers: int) -> dict:
    from bench_data import loader_rate

    from pipelines.data.frame_builder import build_frame_dataset
    from pipelines.data.frame_reader import FrameDataset
    from pipelines.data.synthetic_echonet import write_synthetic_echonet

    torch.set_num_threads(1)
    echonet = write_synthetic_echonet(work / "echonet", num_videos=num_videos, seed=0, num_workers=workers,
                                      overwrite=True)
    start = time.perf_counter()
    build_frame_dataset(echonet, work / "frames", num_workers=workers, progress=False, verbose=False, overwrite=True)
    seconds = time.perf_counter() - start
    summary = json.loads((work / "frames" / "build_summary.json").read_text())
    out = {"videos": summary["total_videos"], "kept_frames": summary["total_frames"],
           "decoded_frames": summary["decode"]["decoded_frames"], "build_s": seconds,
           "build_kept_frames_s": summary["total_frames"] / seconds,
           "build_decoded_frames_s": summary["decode"]["decoded_frames"] / seconds}
    frames = FrameDataset(work / "frames", split="train")
    batch = min(256, len(frames))
    for num_workers in (0, 2):
        out[f"loader_w{num_workers}_img_s"] = _loader_rate(loader_rate, frames, num_workers, loader_images, batch)
    return out


def _loader_rate(loader_rate, frames, num_workers: int, images: int, batch: int) -> float:
    import inspect

    if "batch_size" in inspect.signature(loader_rate).parameters:
        return loader_rate(frames, num_workers, images, batch_size=batch)
    return loader_rate(frames, num_workers, images)


# ----------------------------------------------------------------------------------------------------
# orchestration


def _worker_call(kind: str, kwargs: dict, isolate: bool, timeout: float | None = None) -> dict:
    """Run one cell, in a fresh subprocess when ``isolate`` (own peak RSS, own thread pool)."""
    if not isolate:
        return WORKERS[kind](**kwargs)
    payload = json.dumps({"kind": kind, "kwargs": kwargs}, default=str)
    proc = subprocess.run([sys.executable, __file__, "--_worker", payload], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"{kind} worker failed (rc {proc.returncode}): " + " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


WORKERS = {"network": lambda spec: network_cell(spec), "edm": edm_reference_cell, "optim": optim_cell, "dg": dg_cell,
           "losscurve": loss_curve_cell,
           "inception": inception_cell, "data": lambda **kw: data_cell(Path(kw.pop("work")), **kw)}


def run_suite(args) -> dict:
    rows = set(args.only or ROWS)
    isolate = not args.no_isolate
    results: dict = {"meta": {"torch": torch.__version__, "threads": args.threads, "batch": args.batch,
                              "channels": args.channels, "resolution": args.resolution, "quick": args.quick,
                              "reps": args.reps, "warmup": args.warmup, "isolated": isolate,
                              "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                              "options": {k: getattr(args, k) for k in OPTION_KEYS},
                              "edm_checkout": args.edm_checkout}}
    torch.set_num_threads(args.threads)
    if "ceiling" in rows:
        results["ceiling"] = matmul_ceiling(256 if args.quick else 2048, args.warmup, args.reps)
        _log("ceiling", results["ceiling"])
    if rows & {"train", "sample"}:
        results["networks"] = []
        parts = [part for part in ("train", "sample") if part in rows]
        for arch in args.arch:
            for precision in args.precision:
                cell = {"arch": arch, "precision": precision}
                for part in parts:  # each in its own fresh process
                    spec = dict(arch=arch, precision=precision, batch=args.batch, channels=args.channels,
                                resolution=args.resolution, threads=args.threads, quick=args.quick, warmup=args.warmup,
                                reps=args.reps, train=part == "train", sample=part == "sample", isolated=isolate,
                                **{k: getattr(args, k) for k in OPTION_KEYS})
                    measured = _worker_call("network", {"spec": spec}, isolate)
                    if part == "sample" and "peak_rss_gib" in measured:
                        measured["sample_peak_rss_gib"] = measured.pop("peak_rss_gib")
                    cell.update(measured)
                results["networks"].append(cell)
                _log("network", cell)
        if args.edm_checkout:
            results["edm_reference"] = []
            for arch in args.arch:
                cell = {"arch": arch, "precision": "fp32"}
                for part in parts:
                    measured = _worker_call("edm", dict(checkout=args.edm_checkout, arch=arch, part=part,
                                                        batch=args.batch, channels=args.channels,
                                                        resolution=args.resolution, threads=args.threads,
                                                        warmup=args.warmup, reps=args.reps), True)
                    if part == "sample" and "peak_rss_gib" in measured:
                        measured["sample_peak_rss_gib"] = measured.pop("peak_rss_gib")
                    cell.update(measured)
                results["edm_reference"].append(cell)
                _log("edm", cell)
    if "optim" in rows:
        results["optim"] = []
        for arch in args.arch:
            cell = _worker_call("optim", dict(arch=arch, channels=args.channels, resolution=args.resolution,
                                              quick=args.quick, threads=args.threads, warmup=args.warmup,
                                              reps=args.reps), isolate)
            results["optim"].append(cell)
            _log("optim", cell)
    if "dg" in rows:
        results["dg"] = _worker_call("dg", dict(arch=args.dg_arch, precision=args.dg_precision, channels=args.channels,
                                                resolution=args.resolution, quick=args.quick, threads=args.threads,
                                                batch=args.batch, warmup=args.warmup, reps=args.reps,
                                                steps=args.dg_steps), isolate)
        _log("dg", results["dg"])
    if "losscurve" in rows:
        results["losscurve"] = _worker_call("losscurve", dict(steps=4 if args.quick else args.loss_steps, quick=args.quick,
                                                              threads=args.threads, batch=args.batch), isolate)
        _log("losscurve", {k: v for k, v in results["losscurve"].items() if k != "curves"})
    if "inception" in rows:
        results["inception"] = _worker_call("inception", dict(images=4 if args.quick else 32, warmup=1 if args.quick else 2,
                                                              reps=1 if args.quick else 3, threads=args.threads), isolate)
        _log("inception", results["inception"])
    if "data" in rows:
        with tempfile.TemporaryDirectory(prefix="echodiff-bench-") as work:
            results["data"] = _worker_call("data", dict(work=work, num_videos=4 if args.quick else args.data_videos,
                                                        loader_images=512 if args.quick else 20_000, workers=2), isolate)
        _log("data", results["data"])
    return results


def merge_results(parts: list[dict]) -> dict:
    """Several runs' results as one: list rows concatenated, single rows and the ceiling from the last run
    that has them; ``meta`` from the first, with each part's meta kept under ``parts``."""
    merged: dict = {"meta": dict(parts[0]["meta"])}
    merged["meta"]["parts"] = [part["meta"] for part in parts]
    for part in parts:
        for key, value in part.items():
            if key in ("meta", "table"):
                continue
            if isinstance(value, list):
                merged.setdefault(key, []).extend(value)
            else:
                merged[key] = value
    return merged


def _log(kind: str, cell: dict) -> None:
    print(f"[{kind}] " + json.dumps(cell, default=float), file=sys.stderr, flush=True)


def _fmt(value, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


OPTION_DEFAULTS = {"channels_last": True, "compile": False, "grad_ckpt": False, "optimizer": "fused",
                   "sdpa": "default"}


def _option_suffix(options: dict) -> str:
    changed = [k if v is True else f"{k}={v}" for k, v in options.items() if v != OPTION_DEFAULTS.get(k, v)]
    return f" [{', '.join(changed)}]" if changed else ""


def _ratio(cell: dict, reference: dict, key: str) -> float | None:
    return cell[key] / reference[key] if key in reference and reference[key] else None


def render_table(results: dict) -> str:
    """The suite's one table (markdown), every measured row."""
    meta = results["meta"]
    references = {cell["arch"]: cell for cell in results.get("edm_reference", []) if "error" not in cell}
    ceiling = results.get("ceiling", {})
    lines = [f"EchoDiff benchmark: torch {meta['torch']}, {meta['threads']} threads, batch {meta['batch']}, "
             f"{meta['resolution']}x{meta['resolution']}x{meta['channels']}, median of {meta['reps']} after "
             f"{meta['warmup']} warm-up{' (TINY networks)' if meta['quick'] else ''}; options {meta['options']}",
             "", "| row | config | value | unit | GFLOP/s | % ceiling | peak RSS GiB | vs EDM fp32 (this run) |",
             "|---|---|---:|---|---:|---:|---:|---:|"]

    def add(row, config, value, unit, gflops=None, share=None, rss=None, ratio=None, value_spec=".3f"):
        lines.append(f"| {row} | {config} | {_fmt(value, value_spec)} | {unit} | {_fmt(gflops, '.1f')} | "
                     f"{_fmt(share, '.0%')} | {_fmt(rss, '.2f')} | {_fmt(ratio, '.2f')} |")

    for precision in PRECISIONS:
        if f"{precision}_gflop_s" in ceiling:
            add("ceiling", f"matmul 2048^2 {precision}", ceiling[f"{precision}_gflop_s"], "GFLOP/s", value_spec=".1f")
    for cell in results.get("networks", []):
        name = f"{cell['arch']} {cell['precision']}" + _option_suffix(cell.get("options", {}))
        if "error" in cell:
            lines.append(f"| network | {name} | ERROR: {cell['error'][:150]} | | | | | |")
            continue
        peak = ceiling.get(f"{cell['precision']}_gflop_s")
        ref = references.get(cell["arch"], {})
        if "train_img_s" in cell:
            add("train", f"{name} ({cell['params_M']:.3g}M, {cell['train_gflop_per_img']:.3g} GFLOP/img)",
                cell["train_img_s"], "img/s", cell["train_gflop_s"], cell["train_gflop_s"] / peak if peak else None,
                cell.get("peak_rss_gib"), _ratio(cell, ref, "train_img_s"))
        if "sample_img_nfe_s" in cell:
            add("sample", f"{name} ({cell['forward_gflop_per_img']:.3g} GFLOP/img/NFE)", cell["sample_img_nfe_s"],
                "img*NFE/s", cell["sample_gflop_s"], cell["sample_gflop_s"] / peak if peak else None,
                cell.get("sample_peak_rss_gib"), _ratio(cell, ref, "sample_img_nfe_s"))
    for cell in results.get("edm_reference", []):
        if "error" in cell:
            lines.append(f"| edm-ref | {cell['arch']} | ERROR: {cell['error'][:150]} | | | | | |")
            continue
        for key, row, unit, rss in (("train_img_s", "train", "img/s", "peak_rss_gib"),
                                    ("sample_img_nfe_s", "sample", "img*NFE/s", "sample_peak_rss_gib")):
            if key in cell:
                add(f"edm-ref {row}", f"NVlabs EDM {cell['arch']} fp32 ({cell['params_M']:.3g}M)", cell[key], unit,
                    rss=cell.get(rss), ratio=1.0)
    for cell in results.get("optim", []):
        if "error" in cell:
            lines.append(f"| optim | {cell.get('arch')} | ERROR: {cell['error'][:150]} | | | | | |")
            continue
        for key in ("adam_forloop_s", "adam_foreach_s", "adam_fused_s", "ema_fp32_s", "ema_bf16_s"):
            add("optim", f"{cell['arch']} {key[:-2].replace('_', ' ')}", cell[key], "s/step")
    dg = results.get("dg")
    if dg:
        if "error" in dg:
            lines.append(f"| dg | - | ERROR: {dg['error'][:150]} | | | | | |")
        else:
            add("dg", f"{dg['arch']} {dg['precision']} plain, {dg['steps']} steps", dg["plain_s"], "s")
            add("dg", "w2 = 0 (every step guided)", dg["dg_w2_0_overhead"], "x plain")
            add("dg", "w2 > 0 (every step guided)", dg["dg_w2_pos_overhead"], "x plain")
    curve = results.get("losscurve")
    if curve:
        if "error" in curve:
            lines.append(f"| losscurve | - | ERROR: {curve['error'][:150]} | | | | | |")
        else:
            name = f"ddpmpp {curve['params_M']:.2f}M {curve['resolution']}px, {curve['steps']} steps"
            add("losscurve", f"{name}: fp32 loss, last {curve['tail_steps']} steps", curve["fp32_tail_mean"], "loss")
            add("losscurve", f"{name}: bf16 loss, last {curve['tail_steps']} steps", curve["bf16_tail_mean"], "loss")
            add("losscurve", "bf16 vs fp32 relative gap (tail mean)", curve["tail_rel_gap"], "", value_spec=".2%")
            add("losscurve", "non-finite steps fp32 + bf16",
                curve["nonfinite_steps_fp32"] + curve["nonfinite_steps_bf16"], "steps", value_spec="d")
    inc = results.get("inception")
    if inc:
        if "error" in inc:
            lines.append(f"| inception | - | ERROR: {inc['error'][:150]} | | | | | |")
        else:
            add("inception", "TorchScript as shipped", inc["torchscript_img_s"], "img/s", value_spec=".2f")
            fp32_peak = ceiling.get("fp32_gflop_s")
            add("inception", f"default ({inc['default_backend']}, fp32, {inc['gflop_per_img']:.3g} GFLOP/img), "
                f"max rel err {inc['default_max_rel_err']:.1e}", inc["default_img_s"], "img/s", inc["default_gflop_s"],
                inc["default_gflop_s"] / fp32_peak if fp32_peak else None, value_spec=".2f")
    data = results.get("data")
    if data:
        if "error" in data:
            lines.append(f"| data | - | ERROR: {data['error'][:150]} | | | | | |")
        else:
            add("data", f"build ({data['videos']} videos, {data['kept_frames']} frames kept)",
                data["build_kept_frames_s"], "kept frames/s", value_spec=".0f")
            add("data", "build, decoded frames", data["build_decoded_frames_s"], "frames/s", value_spec=".0f")
            for workers in (0, 2):
                add("data", f"DataLoader FrameDataset, {workers} workers", data[f"loader_w{workers}_img_s"], "img/s",
                    value_spec=".0f")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=ROWS, action="append", help="row(s) to run (repeatable; default all)")
    parser.add_argument("--arch", choices=ARCHS, action="append",
                        help=f"network(s) (repeatable; default {', '.join(DEFAULT_ARCHS)})")
    parser.add_argument("--precision", choices=PRECISIONS, action="append", help="fp32 / bf16 (default both)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=3, help="3 matches the EDM reference figures (echo is 1)")
    parser.add_argument("--resolution", type=int, default=None, help="default 64 (16 with --quick)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=None, help="timed runs per cell (default 2; 1 with --quick)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny networks and data: a smoke test in seconds")
    parser.add_argument("--no_isolate", action="store_true",
                        help="run cells in this process (faster start; peak RSS is then the process's)")
    parser.add_argument("--json", default=None, help="write the results here (default: benchmark_results.json)")
    parser.add_argument("--no_channels_last", dest="channels_last", action="store_false",
                        help="NCHW network and inputs (channels-last is the training default)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (first step = compile)")
    parser.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing (memory for speed)")
    parser.add_argument("--optimizer", choices=("foreach", "fused", "forloop"), default="fused",
                        help="Adam implementation in the train rows")
    parser.add_argument("--sdpa", choices=("default", "math", "flash"), default="default", help="SDPA backend")
    parser.add_argument("--dg_arch", choices=ARCHS, default="ddpmpp")
    parser.add_argument("--dg_precision", choices=PRECISIONS, default="bf16")
    parser.add_argument("--dg_steps", type=int, default=2, help="EDM steps of the DG timing (2N-1 NFE)")
    parser.add_argument("--edm_checkout", default=None,
                        help="a checkout of github.com/NVlabs/edm (outside this repo): measure its networks in this "
                             "run (fp32, fresh processes) for the 'vs EDM' column; none: no ratio")
    parser.add_argument("--data_videos", type=int, default=40)
    parser.add_argument("--loss_steps", type=int, default=200, help="steps of the bf16-vs-fp32 loss-curve row")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="render one table from earlier --json files (rows run one command at a time)")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.channels < 1 or args.threads < 1 or args.warmup < 0 or args.dg_steps < 2:
        parser.error("--batch, --channels, --threads must be >= 1, --dg_steps >= 2, --warmup >= 0")
    if args.reps is None:
        args.reps = 1 if args.quick else 2
    if args.reps < 1:
        parser.error("--reps must be >= 1")
    if args.resolution is None:
        args.resolution = 16 if args.quick else 64
    args.arch = args.arch or list(DEFAULT_ARCHS)
    args.precision = args.precision or list(PRECISIONS)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args._worker:
        request = json.loads(args._worker)
        print(json.dumps(WORKERS[request["kind"]](**request["kwargs"]), default=float))
        return {}
    results = merge_results([json.loads(Path(f).read_text()) for f in args.merge]) if args.merge else run_suite(args)
    table = render_table(results)
    results["table"] = table
    print(table)
    path = Path(args.json or "benchmark_results.json")
    path.write_text(json.dumps(results, indent=2, default=float))
    print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main()
