#!/usr/bin/env python3
"""Data pipeline speed: synthetic generation, frame-dataset build, DataLoader throughput per storage.

    flock /tmp/echodiff-cpu.lock python benchmarks/bench_data.py --work /tmp/bench-data --num_videos 200

Prints a table and writes WORK/bench_data.json. Storages compared at 64x64 (same frames):
PNG ``Image()`` (what the builder writes; read through FrameDataset's batched OpenCV decode, and per item
through datasets' own PIL decode, as diffusers' scripts read it), raw uint8 bytes in ``Value("binary")``
(what the builder wrote before; FrameDataset batched and per item) and ``Array3D`` uint8.

``--only fid_memory`` measures the peak RSS of the FID reference statistics at 1k, 4k and 16k images (each in a
fresh process; a fixed random projection stands in for Inception, whose features have the same size): the
streamed statistics against the old all-in-memory features + ``np.cov``.

    flock /tmp/heavy.lock python benchmarks/bench_data.py --only fid_memory
"""

import argparse
import io
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.data.frame_builder import build_frame_dataset  # noqa: E402
from pipelines.data.frame_reader import FrameDataset  # noqa: E402
from pipelines.data.synthetic_echonet import write_synthetic_echonet  # noqa: E402


class PerItem(torch.utils.data.Dataset):
    """FrameDataset without its batched path: what a plain map-style Dataset costs."""

    def __init__(self, frames: FrameDataset):
        self.frames = frames

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, i):
        return self.frames[i]


class PngItems(torch.utils.data.Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        row = self.ds[int(i)]
        return {"image": torch.from_numpy(np.asarray(row["image"])[None].copy()), "EF": row["EF"]}


class ArrayItems(torch.utils.data.Dataset):
    def __init__(self, ds):
        self.ds = ds.with_format("numpy")

    def __len__(self):
        return len(self.ds)

    def __getitems__(self, indices):
        batch = self.ds[[int(i) for i in indices]]
        images = torch.from_numpy(batch["image"])
        return [{"image": images[k], "EF": float(batch["EF"][k])} for k in range(len(indices))]

    def __getitem__(self, i):
        return self.__getitems__([i])[0]


def loader_rate(dataset, num_workers: int, images: int, batch_size: int = 256) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                                         persistent_workers=num_workers > 0, drop_last=True)
    seen = 0
    next(iter(loader))  # start-up (worker spawn) is not throughput
    start = time.perf_counter()
    while seen < images:
        for batch in loader:
            seen += batch["image"].shape[0]
            if seen >= images:
                break
    return seen / (time.perf_counter() - start)


def other_storages(frames: FrameDataset, work: Path):
    """The same frames as raw bytes (the builder's format before PNG; a FrameDataset folder) and Array3D."""
    import datasets

    images = frames.images_uint8()[:, 0]
    ef = frames.column("EF").astype(float)
    raw = frames.dataset.cast_column("image", datasets.Image(decode=False)).map(
        lambda row: {"raw": np.asarray(Image.open(io.BytesIO(row["image"]["bytes"]))).tobytes()},
        remove_columns=["image"]).rename_column("raw", "image")
    datasets.DatasetDict({"train": raw}).save_to_disk(str(work / "frames-raw"))

    def array_rows():
        for image, value in zip(images, ef):
            yield {"image": image[None], "EF": value}

    r = images.shape[-1]
    array = datasets.Dataset.from_generator(array_rows, cache_dir=str(work / "hf_cache" / "array"), features=datasets.Features(
        {"image": datasets.Array3D((1, r, r), "uint8"), "EF": datasets.Value("float32")}))
    return FrameDataset(work / "frames-raw", split="train"), array


class _Projection(torch.nn.Module):
    """Stand-in for Inception: uint8 images -> 2048 positive float32 features (same size as Inception's)."""

    num_features = 2048

    def __init__(self, pixels: int):
        super().__init__()
        self.weight = torch.randn(pixels, 2048, generator=torch.Generator().manual_seed(0)) / pixels**0.5

    def forward(self, images):
        return torch.relu(images.flatten(1).float() / 64 @ self.weight)


def fid_memory_child(num_images: int, mode: str) -> None:
    """One measurement (in its own process): peak RSS growth of the reference statistics of ``num_images``."""
    from pipelines.evaluation.feature_cache import ArrayFrames, dataset_features, dataset_statistics
    from pipelines.evaluation.fid import feature_statistics

    rng = np.random.default_rng(0)
    frames = ArrayFrames(rng.integers(0, 256, size=(num_images, 1, 16, 16), dtype=np.uint8), "bench", split="train")
    detector = _Projection(16 * 16)
    indices = np.arange(num_images)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if mode == "in-memory":  # what reference_statistics did before: every feature in float64, then np.cov
        feature_statistics(dataset_features(frames, indices, detector))
    else:
        dataset_statistics(frames, indices, detector)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"num_images": num_images, "mode": mode, "peak_rss_growth_mb": (peak - before) / 1024,
                      "seconds": time.perf_counter() - start}))


def fid_memory_rows(sizes=(1000, 4000, 16000)) -> list[dict]:
    rows = []
    for mode in ("in-memory", "streamed"):
        for n in sizes:
            out = subprocess.run([sys.executable, __file__, "--fid_memory_child", str(n), mode], check=True,
                                 capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/echodiff-bench-data")
    parser.add_argument("--num_videos", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--loader_images", type=int, default=60_000, help="images read per DataLoader measurement")
    parser.add_argument("--only", choices=["fid_memory"], default=None, help="only this measurement")
    parser.add_argument("--fid_memory_child", nargs=2, metavar=("N", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.fid_memory_child:
        return fid_memory_child(int(args.fid_memory_child[0]), args.fid_memory_child[1])
    if args.only == "fid_memory":
        rows = fid_memory_rows()
        print("FID reference statistics, peak RSS growth (fresh process each; projection stand-in for Inception):")
        for row in rows:
            print(f"  {row['mode']:<10} {row['num_images']:>6} images: {row['peak_rss_growth_mb']:>8.1f} MB "
                  f"({row['seconds']:.2f} s)")
        return rows
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    results = {}

    start = time.perf_counter()
    echonet = write_synthetic_echonet(work / "echonet", num_videos=args.num_videos, seed=0, num_workers=args.workers)
    results["generate_seconds"] = time.perf_counter() - start
    results["generate_videos"] = args.num_videos

    start = time.perf_counter()
    build_frame_dataset(echonet, work / "frames", num_workers=args.workers, progress=False)
    build_seconds = time.perf_counter() - start
    summary = json.loads((work / "frames" / "build_summary.json").read_text())
    results["build"] = {"videos": summary["total_videos"], "kept_frames": summary["total_frames"],
                        "decoded_frames": summary["decode"]["decoded_frames"], "seconds": build_seconds,
                        "decode_seconds": summary["decode"]["seconds"],
                        "decoded_frames_per_s": summary["decode"]["decoded_frames"] / summary["decode"]["seconds"],
                        "kept_frames_per_s_end_to_end": summary["total_frames"] / build_seconds}

    # DataLoader: a stride-1 build gives enough distinct rows.
    start = time.perf_counter()
    build_frame_dataset(echonet, work / "frames-all", frame_stride=1, num_workers=args.workers, progress=False,
                        verbose=False)
    results["build_stride1"] = {"seconds": time.perf_counter() - start}
    frames = FrameDataset(work / "frames-all", split="train")
    raw, array = other_storages(frames, work)
    candidates = {"PNG Image() (FrameDataset, batched)": frames, "PNG Image() (FrameDataset, per item)": PerItem(frames),
                  "PNG Image() (datasets' PIL decode, per item)": PngItems(frames.dataset),
                  "binary (FrameDataset, batched)": raw, "binary (per item)": PerItem(raw),
                  "Array3D uint8 (batched)": ArrayItems(array)}
    results["loader_rows"] = len(frames)
    rows_all = sum(t["frames"] for t in json.loads((work / "frames-all" / "build_summary.json").read_text())["splits"].values())
    results["build_stride1"].update(kept_frames=rows_all, kept_frames_per_s=rows_all / results["build_stride1"]["seconds"])
    results["loader_img_per_s"] = {}
    for name, dataset in candidates.items():
        for num_workers in (0, 2):
            n = args.loader_images if "PIL" not in name and "Array" not in name else args.loader_images // 4
            rate = loader_rate(dataset, num_workers, n)
            results["loader_img_per_s"][f"{name}, workers={num_workers}"] = rate

    results["images_uint8_img_per_s"] = {}
    for name, dataset in (("PNG", frames), ("binary", raw)):
        start = time.perf_counter()
        bulk = dataset.images_uint8()
        results["images_uint8_img_per_s"][name] = len(bulk) / (time.perf_counter() - start)
    results["bytes_per_frame"] = {name: sum(f.stat().st_size for f in (work / folder / "train").glob("*.arrow")) / len(frames)
                                  for name, folder in (("PNG", "frames-all"), ("binary", "frames-raw"))}

    b = results["build"]
    print(f"generate: {args.num_videos} videos in {results['generate_seconds']:.1f} s ({args.workers} processes)")
    print(f"build ({args.workers} processes): {b['videos']} videos, {b['decoded_frames']} decoded / "
          f"{b['kept_frames']} kept frames in {b['seconds']:.1f} s; decode {b['decoded_frames_per_s']:.0f} decoded "
          f"frames/s, end to end {b['kept_frames_per_s_end_to_end']:.0f} kept frames/s")
    b1 = results["build_stride1"]
    print(f"build, stride 1: {b1['kept_frames']} frames in {b1['seconds']:.1f} s = {b1['kept_frames_per_s']:.0f} frames/s")
    print(f"DataLoader, 64x64, batch 256, shuffled, {results['loader_rows']} rows:")
    for name, rate in results["loader_img_per_s"].items():
        print(f"  {name:<45} {rate:>10.0f} img/s")
    for name, rate in results["images_uint8_img_per_s"].items():
        print(f"images_uint8 bulk read, {name}: {rate:.0f} img/s; {results['bytes_per_frame'][name]:.0f} bytes/frame on disk")
    (work / "bench_data.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
