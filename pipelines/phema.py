"""Post-hoc EMA (Karras et al. 2024, EDM2, section 3 and appendix C): power-function EMA profiles tracked
during training, stored as snapshots, and any other EMA length reconstructed from them afterwards.

A power-function EMA with exponent gamma averages the weights theta(tau) seen up to time t with the
density (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t]; its width relative to t is
std = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (Eq. 123). Tracked with steps of ``delta`` images,
beta = (1 - delta / t)^(gamma + 1) (Eq. 127); the weight the average at step k gives the weights after step
j is then exactly (j^(gamma+1) - (j-1)^(gamma+1)) / k^(gamma+1), the continuous profile integrated over
that step (the weights being constant during it).

Reconstruction: the snapshots' profiles r_i span a space; the target profile r is projected onto it by
least squares in L2 (the inner products of two power-function profiles have the closed form of Eq. 151),
and the reconstructed weights are sum_i x_i theta_i. For any weight trajectory the error is then at most
||r - sum_i x_i r_i||_2 ||theta||_2 (Cauchy-Schwarz), which :func:`reconstruction_residual` computes.

Time is counted in images (as EDM2), so the profiles mean the same at any batch size.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from pipelines.ema import EDMEma
from pipelines.utils import atomic_write

DEFAULT_STDS = (0.050, 0.100)  # EDM2's two tracked profiles
MAX_STD = math.sqrt(1 / 12)  # gamma -> 0 (a uniform average over the whole run): 0.2887
SNAPSHOT_DIR = "phema"
_SNAPSHOT_NAME = re.compile(r"phema-(\d{12})-(\d+\.\d+)\.safetensors")


def check_std(std: float, name: str = "ema_std") -> float:
    if not 0 < std < MAX_STD:
        raise ValueError(f"{name}: a power-function EMA's relative std must be in (0, {MAX_STD:.4f}), got {std}")
    return float(std)


def std_to_exp(std: float | np.ndarray) -> np.ndarray:
    """The exponent gamma of relative width ``std``: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - std^-2) gamma + (12 - std^-2) = 0 (Eq. 123 solved for gamma, EDM2 Alg. 2)."""
    std = np.asarray(std, dtype=np.float64)
    roots = [np.roots([1.0, 7.0, 16.0 - s**-2, 12.0 - s**-2]) for s in std.reshape(-1)]
    return np.array([r[np.abs(r.imag) < 1e-9].real.max() for r in roots]).reshape(std.shape)


def exp_to_std(exp: float | np.ndarray) -> np.ndarray:
    exp = np.asarray(exp, dtype=np.float64)
    return np.sqrt((exp + 1) / ((exp + 2) ** 2 * (exp + 3)))


def power_function_beta(std: float, t_next: float, t_delta: float) -> float:
    """EMA decay of a step of ``t_delta`` images that ends at ``t_next`` images (Eq. 127)."""
    return float((1 - t_delta / t_next) ** (std_to_exp(std) + 1))


def profile_inner_products(a_t, a_std, b_t, b_std) -> np.ndarray:
    """<r_a, r_b> in L2 of two power-function profiles ending at ``a_t`` and ``b_t`` (EDM2 Eq. 151)."""
    a_t, b_t = np.asarray(a_t, np.float64), np.asarray(b_t, np.float64)
    a_exp, b_exp = std_to_exp(a_std), std_to_exp(b_std)
    ratio_exp = np.where(a_t < b_t, b_exp, -a_exp)
    return (a_exp + 1) * (b_exp + 1) * (a_t / b_t) ** ratio_exp / ((a_exp + b_exp + 1) * np.maximum(a_t, b_t))


def solve_posthoc_coefficients(in_t: Sequence[float], in_std: Sequence[float], out_t: float,
                               out_std: Sequence[float]) -> np.ndarray:
    """(inputs, outputs) coefficients x: the least-squares profile of each output std as sum_i x_i r_i,
    normalised to sum 1 (a weighted average of snapshots, as EDM2 Alg. 3)."""
    in_t, in_std = np.asarray(in_t, np.float64), np.asarray(in_std, np.float64)
    out_std = np.asarray(out_std, np.float64).reshape(-1)
    out_t = np.full_like(out_std, float(out_t))
    gram = profile_inner_products(in_t[:, None], in_std[:, None], in_t[None, :], in_std[None, :])
    cross = profile_inner_products(in_t[:, None], in_std[:, None], out_t[None, :], out_std[None, :])
    coefs = np.linalg.solve(gram, cross)
    return coefs / coefs.sum(axis=0, keepdims=True)


def reconstruction_residual(in_t, in_std, out_t: float, out_std: float, coefs: np.ndarray) -> float:
    """||r_out - sum_i x_i r_i||_2: bounds |error| / ||theta||_2 of a reconstruction with ``coefs`` (1-D)."""
    in_t, in_std, x = np.asarray(in_t, np.float64), np.asarray(in_std, np.float64), np.asarray(coefs, np.float64)
    gram = profile_inner_products(in_t[:, None], in_std[:, None], in_t[None, :], in_std[None, :])
    cross = profile_inner_products(in_t, in_std, float(out_t), float(out_std))
    target = profile_inner_products(float(out_t), float(out_std), float(out_t), float(out_std))
    return float(np.sqrt(max(target - 2 * x @ cross + x @ gram @ x, 0.0)))


class PowerFunctionEMA(EDMEma):
    """Power-function EMAs of ``model``'s parameters and floating-point buffers, one per relative ``std``.

    ``update(model, batch_size, images_seen)`` after each optimiser step (``images_seen`` counts the images
    before it, as :class:`EDMEma`); the first step copies the weights (beta = 0).
    """

    def __init__(self, model: torch.nn.Module, stds: Sequence[float] = DEFAULT_STDS):
        stds = [check_std(s, "phema_std") for s in stds]
        if not stds:
            raise ValueError("phema_std: expected at least one relative std, got none")
        self.stds = stds
        self.exponents = [float(e) for e in std_to_exp(np.array(stds))]
        self._init_shadows(model, len(stds))

    def betas(self, batch_size: int, images_seen: int) -> list[float]:
        t_next = images_seen + batch_size
        return [(1 - batch_size / t_next) ** (exp + 1) for exp in self.exponents]

    def settings(self) -> dict[str, object]:
        return {"stds": self.stds}

    def check_saved_settings(self, saved: dict[str, str], path: str) -> None:
        stds = json.loads(saved.get("stds", "null"))
        if stds != self.stds:
            raise ValueError(f"{path}: post-hoc EMA stds {stds} in the checkpoint, but this run asks for "
                             f"{self.stds}; pass the same --phema_std to resume")

    # ---- snapshots: one safetensors file per profile and time, written atomically ----
    def write_snapshots(self, folder: str | Path, images_seen: int, storage_dtype: torch.dtype = torch.float32
                        ) -> list[Path]:
        """``folder/phema-<images seen, 12 digits>-<std>.safetensors`` for each profile (replacing a file of
        the same point, as a resumed run re-reaches it); a killed write leaves only a hidden temporary file."""
        written = []
        for std, shadow in zip(self.stds, self.shadows):
            tensors = {name: t.detach().to("cpu", storage_dtype).contiguous() for name, t in zip(self.names, shadow)}
            data = save(tensors, metadata={"std": repr(std), "images_seen": str(images_seen)})
            path = Path(folder) / snapshot_name(images_seen, std)
            written.append(atomic_write(path, lambda handle, data=data: handle.write(data)))
        return written

    def snapshot_bytes(self, storage_dtype: torch.dtype = torch.float32) -> int:
        """Disk size of one snapshot of all profiles (tensor data; the headers add a few kB)."""
        size = torch.empty((), dtype=storage_dtype).element_size()
        return len(self.stds) * size * sum(t.numel() for t in self.shadows[0])


def snapshot_name(images_seen: int, std: float) -> str:
    return f"phema-{images_seen:012d}-{std:.3f}.safetensors"


@dataclass(frozen=True)
class Snapshot:
    path: Path
    images_seen: int
    std: float


def remove_partial_snapshots(folder: str | Path) -> list[Path]:
    """Deletes the hidden temporary files of snapshot writes that were killed (one process only)."""
    folder = Path(folder)
    leftovers = [p for p in folder.glob(".phema-*.tmp-*")] if folder.is_dir() else []
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


def list_snapshots(folder: str | Path) -> list[Snapshot]:
    """The complete snapshots in ``folder`` (hidden temporary files of killed writes are not listed), by time."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no post-hoc EMA snapshot folder (train with --phema)")
    found = []
    for path in folder.iterdir():
        if _SNAPSHOT_NAME.fullmatch(path.name):
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            found.append(Snapshot(path, int(meta["images_seen"]), float(meta["std"])))
    return sorted(found, key=lambda s: (s.images_seen, s.std))


def reconstruct(snapshots: Sequence[Snapshot], out_std: float, out_images: int | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """The weights of the power-function EMA of relative width ``out_std`` at ``out_images`` (default: the
    latest snapshot's time), as float32 tensors by name, and what it was made from (coefficients, residual)."""
    check_std(out_std)
    if not snapshots:
        raise ValueError("reconstruct: no snapshots")
    out_images = max(s.images_seen for s in snapshots) if out_images is None else int(out_images)
    used = [s for s in snapshots if 0 < s.images_seen <= out_images]
    in_t, in_std = [s.images_seen for s in used], [s.std for s in used]
    coefs = solve_posthoc_coefficients(in_t, in_std, out_images, [out_std])[:, 0]
    total: dict[str, torch.Tensor] = {}
    for snapshot, coef in zip(used, coefs):
        for name, tensor in load_file(str(snapshot.path)).items():
            term = tensor.to(torch.float64) * float(coef)
            total[name] = total[name] + term if name in total else term
    info = {"std": out_std, "images_seen": out_images, "snapshots": len(used),
            "residual": reconstruction_residual(in_t, in_std, out_images, out_std, coefs)}
    return {name: t.to(torch.float32) for name, t in total.items()}, info


@torch.no_grad()
def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Write reconstructed ``tensors`` (the names an EMA tracks: parameters and float buffers) into ``model``."""
    targets = dict(EDMEma._tracked(model))
    if set(targets) != set(tensors):
        odd = sorted(set(targets) ^ set(tensors))[:3]
        raise ValueError(f"post-hoc EMA snapshots do not match the model's tensors (e.g. {odd})")
    for name, target in targets.items():
        target.copy_(tensors[name].to(device=target.device, dtype=target.dtype))
    return model
