"""Inception (FID detector) throughput: img/s per variant and max relative feature error vs the plain path.

The plain path is the shipped TorchScript file run as is (NCHW, fp32) on NVlabs-preprocessed input;
every variant gets the same uint8 images (synthetic echo frames, 64x64 gray) end to end, preprocessing
included. Error = max |f - f_plain| / max |f_plain| over the batch (the metric's bound is 1e-4).

    python benchmarks/bench_inception.py                  # table, batch 32
    python benchmarks/bench_inception.py --compile --bf16 # also torch.compile and (disallowed) bf16 rows
    python benchmarks/bench_inception.py --quick          # smoke test: 4 images, 1 repeat
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.data.synthetic_echonet import synthetic_frames  # noqa: E402
from pipelines.evaluation.fid import InceptionDetector  # noqa: E402


def time_detector(fn, images, warmup: int, repeats: int) -> tuple[torch.Tensor, float]:
    for _ in range(warmup):  # TorchScript's profiling executor optimises after its first calls
        out = fn(images)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(images)
        times.append(time.perf_counter() - start)
    return out, len(images) / statistics.median(times)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32, help="images per timed call (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant; the median counts")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows (reports compile time)")
    parser.add_argument("--bf16", action="store_true", help="add a bf16-autocast row (not allowed for the metric)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 4 images, 1 repeat, 1 warm-up")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.repeats, args.warmup = 4, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    images = torch.from_numpy(synthetic_frames(args.images, seed=0, resolution=64))

    plain = InceptionDetector(backend="torchscript", channels_last=False, micro_batch=0)
    reference, plain_speed = time_detector(plain, images, args.warmup, args.repeats)
    rows = [{"variant": "torchscript as shipped (plain, NCHW, one batch)", "img_per_s": plain_speed, "max_rel_err": 0.0}]

    variants = [
        ("torchscript frozen, NCHW, micro-batch 8", dict(backend="torchscript-frozen", channels_last=False, micro_batch=8)),
        ("torchscript frozen, channels-last, micro-batch 8", dict(backend="torchscript-frozen", micro_batch=8)),
        ("eager (BN folded), NCHW, micro-batch 8", dict(backend="eager", channels_last=False, micro_batch=8)),
        ("eager (BN folded), channels-last, one batch", dict(backend="eager", micro_batch=0)),
        ("eager (BN folded), channels-last, micro-batch 16", dict(backend="eager", micro_batch=16)),
        ("eager (BN folded), channels-last, micro-batch 8 [default]", dict(backend="eager", micro_batch=8)),
        ("eager (BN folded), channels-last, micro-batch 4", dict(backend="eager", micro_batch=4)),
    ]
    detectors = {}
    for name, kwargs in variants:
        detectors[name] = detector = InceptionDetector(**kwargs)
        out, speed = time_detector(detector, images, args.warmup, args.repeats)
        rows.append({"variant": name, "img_per_s": speed, "max_rel_err": relative_error(out, reference)})

    default = detectors["eager (BN folded), channels-last, micro-batch 8 [default]"]
    with torch.inference_mode():
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(plain.net))
    opt = InceptionDetector(backend="torchscript", channels_last=False, micro_batch=8)
    opt.net = frozen
    out, speed = time_detector(opt, images, args.warmup, args.repeats)
    rows.append({"variant": "torchscript freeze + optimize_for_inference, micro-batch 8", "img_per_s": speed,
                 "max_rel_err": relative_error(out, reference)})

    if args.compile:
        compiled = InceptionDetector(backend="eager", micro_batch=8)
        compiled.net = torch.compile(compiled.net)
        start = time.perf_counter()
        compiled(images[:8])
        compile_s = time.perf_counter() - start
        out, speed = time_detector(compiled, images, args.warmup, args.repeats)
        rows.append({"variant": f"eager + torch.compile (compile {compile_s:.0f} s)", "img_per_s": speed,
                     "max_rel_err": relative_error(out, reference)})
    if args.bf16:
        def bf16(x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return default(x)
        out, speed = time_detector(bf16, images, args.warmup, args.repeats)
        rows.append({"variant": "eager + bf16 autocast (NOT allowed: accuracy)", "img_per_s": speed,
                     "max_rel_err": relative_error(out, reference)})

    print(f"Inception features, {args.images} images 64x64 gray -> 299, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"| {'variant':<60} | {'img/s':>7} | {'speedup':>7} | {'max rel err':>11} |")
    print(f"|{'-' * 62}|{'-' * 9}|{'-' * 9}|{'-' * 13}|")
    for row in rows:
        row["speedup"] = row["img_per_s"] / plain_speed
        print(f"| {row['variant']:<60} | {row['img_per_s']:7.2f} | {row['speedup']:6.2f}x | {row['max_rel_err']:11.2e} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.double() - reference.double()).abs().max() / reference.double().abs().max())


if __name__ == "__main__":
    main()
