"""Training throughput (images/s) of the real train step, per architecture at the paper's size.

    python benchmarks/bench_training.py --arch adm ddpmpp ncsnpp --mixed_precision no bf16

Each (arch, precision) runs in its own process: build the network at 64x64 (1 channel, dropout 0.05),
EDM preconditioning and loss, Adam and the EMA, then time ``pipelines.training.step.train_step`` + EMA
update at batch 8 (one process, no accumulation) on random images; reports the median of the timed
steps after the warm-up steps, and the process's peak resident memory.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.networks import ARCHITECTURES  # noqa: E402


def run_one(arch: str, mixed_precision: str, batch: int, warmup: int, reps: int, threads: int) -> dict:
    import torch
    from accelerate import Accelerator

    from pipelines.ema import EDMEma
    from pipelines.training import TrainConfig
    from pipelines.training.data_order import batch_layout
    from pipelines.training.stats import TrainStats
    from pipelines.training.step import build_components, train_step

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = TrainConfig(dataset="-", output_dir="-", arch=arch, batch_size=batch, mixed_precision=mixed_precision)
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
    net, loss_fn, _ = build_components(cfg, resolution=64, channels=1)
    ema = EDMEma(net, cfg.ema_halflife_kimg, cfg.ema_rampup_ratio)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    model, optimizer = accelerator.prepare(net, optimizer)
    layout = batch_layout(batch, 1, None)
    stats = TrainStats(accelerator.device)
    images = torch.randint(0, 256, (batch, 1, 64, 64), dtype=torch.uint8)
    times = []
    for step in range(warmup + reps):
        seen = 10**7 + step * batch  # past the lr warm-up: real updates
        t0 = time.perf_counter()
        train_step(accelerator, model, optimizer, loss_fn, [(images, range(seen, seen + batch))], cfg, layout,
                   stats, seen)
        ema.update(net, batch, seen)
        times.append(time.perf_counter() - t0)
    timed = times[warmup:]
    median = statistics.median(timed)
    return {
        "arch": arch, "mixed_precision": mixed_precision, "batch": batch, "threads": threads,
        "params_M": round(sum(p.numel() for p in net.parameters()) / 1e6, 1),
        "step_s_median": round(median, 3), "step_s_all": [round(t, 3) for t in times],
        "images_per_s": round(batch / median, 3),
        "peak_rss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", nargs="+", default=list(ARCHITECTURES), choices=sorted(ARCHITECTURES))
    p.add_argument("--mixed_precision", nargs="+", default=["no", "bf16"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single:
        print(json.dumps(run_one(args.arch[0], args.mixed_precision[0], args.batch, args.warmup, args.reps,
                                 args.threads)))
        return
    rows = []
    for arch in args.arch:
        for mp in args.mixed_precision:
            out = subprocess.run(
                [sys.executable, __file__, "--single", "--arch", arch, "--mixed_precision", mp, "--batch",
                 str(args.batch), "--warmup", str(args.warmup), "--reps", str(args.reps), "--threads",
                 str(args.threads)], capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'arch':8} {'precision':9} {'params M':>8} {'s/step':>8} {'img/s':>7} {'peak GiB':>8}")
    for r in rows:
        print(f"{r['arch']:8} {r['mixed_precision']:9} {r['params_M']:8.1f} {r['step_s_median']:8.2f} "
              f"{r['images_per_s']:7.2f} {r['peak_rss_GiB']:8.2f}")


if __name__ == "__main__":
    main()
