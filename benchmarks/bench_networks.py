"""Forward and forward+backward time of the paper's networks (batch 8, 64x64, 1 channel by default).

    flock /tmp/echodiff-cpu.lock python benchmarks/bench_networks.py --arch adm --reps 2
    python benchmarks/bench_networks.py --quick          # tiny nets, seconds

Each cell is the median wall time over ``--reps`` repetitions after one warm-up call.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from pipelines.networks import ARCHITECTURES, build_network, tiny_config  # noqa: E402


def _timed(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_network(arch, batch, resolution, channels, precisions, reps, quick, device):
    torch.manual_seed(0)
    overrides = tiny_config(arch, resolution) if quick else {"resolution": resolution}
    net = build_network(arch, channels=channels, **overrides).to(device).train()
    n_params = sum(p.numel() for p in net.parameters())
    x = torch.randn(batch, channels, resolution, resolution, device=device)
    t = torch.randn(batch, device=device)
    rows = []
    for precision in precisions:
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

        def forward(autocast=autocast):
            with torch.no_grad(), autocast:
                net(x, t)

        def forward_backward(autocast=autocast):
            net.zero_grad(set_to_none=True)
            with autocast:
                out = net(x, t).sample
            out.float().square().mean().backward()

        fwd = _timed(forward, reps)
        fwd_bwd = _timed(forward_backward, reps)
        rows.append((arch, n_params, precision, fwd, fwd_bwd))
        print(f"  {arch:7s} {precision}: forward {fwd:.3f} s, forward+backward {fwd_bwd:.3f} s", file=sys.stderr,
              flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), action="append",
                        help="architecture(s) to time (repeatable; default all)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both",
                        help="fp32, bf16 autocast, or both")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=None, help="default 64 (16 with --quick)")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per cell (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny test-size networks instead of paper size")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.resolution is None:
        args.resolution = 16 if args.quick else 64
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    device = torch.device(args.device)

    rows = []
    for arch in args.arch or sorted(ARCHITECTURES):
        rows += bench_network(arch, args.batch, args.resolution, args.channels, precisions, args.reps, args.quick,
                              device)
    print(f"\nbatch {args.batch}, {args.resolution}x{args.resolution}x{args.channels}, device {device}, "
          f"{torch.get_num_threads()} threads, median of {args.reps} after 1 warm-up"
          f"{', TINY nets' if args.quick else ''}")
    print("| arch | params | precision | forward (s) | forward+backward (s) |\n|---|---:|---|---:|---:|")
    for arch, n_params, precision, fwd, fwd_bwd in rows:
        print(f"| {arch} | {n_params:,} | {precision} | {fwd:.3f} | {fwd_bwd:.3f} |")


if __name__ == "__main__":
    main()
