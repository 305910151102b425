"""Synthetic EchoNet-Dynamic-layout folder generator (for the demo, the tests and the benchmarks).

Writes ``Videos/*.avi`` (OpenCV MJPG, 112x112, BGR 3-channel like EchoNet's own files),
``FileList.csv`` (FileName without suffix, EF, ESV, EDV, FrameHeight, FrameWidth, FPS, NumberOfFrames,
Split) and ``VolumeTracings.csv`` (FileName with ``.avi``, X1, Y1, X2, Y2, Frame; per traced frame one
long-axis row then 20 perpendicular chords, end-systolic frame first as in EchoNet's files).

Content: a fan-shaped sector on black with depth attenuation, near-field clutter and temporally
correlated speckle; four chambers (LV, RV, LA, RA) with myocardial walls whose LV cavity is a
prolate ellipsoid sized from the video's EDV/ESV at its depth, so the method-of-disks volume of the
tracings reproduces EDV and ESV, and EF = 100 (EDV - ESV) / EDV. Each video has its own depth, gain,
heart rate, FPS, frame count, tilt and tissue levels. Everything is a pure function of
(seed, parametrisation, video index): the same call gives byte-identical CSVs and frames, whatever
the number of worker processes, and a larger ``num_videos`` extends a smaller one.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from pipelines.errors import OutputExistsError, UserInputError
from pipelines.utils import atomic_write, atomic_write_json

from .layout import FILELIST_COLUMNS, SYNTHETIC_MARKER, TRACING_COLUMNS, worker_context

FRAME_SIZE = 112
NUM_CHORDS = 20
# 6:1:1 per block of 8 videos ~ EchoNet's 7,465 / 1,288 / 1,277 and gives tiny sets every split.
_SPLIT_PATTERN = ("TRAIN",) * 6 + ("VAL", "TEST")


@dataclasses.dataclass(frozen=True)
class EchoStyle:
    """Ranges the per-video parameters are drawn from (uniform unless stated)."""

    sector_half_angle_deg: tuple[float, float] = (34.0, 40.0)
    sector_radius_px: tuple[float, float] = (100.0, 108.0)
    depth_cm: tuple[float, float] = (14.0, 19.0)
    gain: tuple[float, float] = (0.85, 1.2)
    heart_rate_bpm: tuple[float, float] = (55.0, 110.0)
    fps_typical: int = 50
    fps_typical_probability: float = 0.85
    fps_other: tuple[int, int] = (30, 75)
    num_frames: tuple[int, int] = (30, 80)
    ef_mean_sd_clip: tuple[float, float, float, float] = (55.0, 12.0, 12.0, 80.0)
    edv_mean_sd_clip: tuple[float, float, float, float] = (115.0, 40.0, 40.0, 280.0)
    lv_aspect: tuple[float, float] = (1.6, 2.0)
    tilt_rad: tuple[float, float] = (-0.15, 0.15)
    wall_cm: tuple[float, float] = (0.8, 1.2)
    wall_level: tuple[float, float] = (0.7, 0.95)
    tissue_level: tuple[float, float] = (0.2, 0.32)
    blood_level: tuple[float, float] = (0.02, 0.06)
    attenuation: tuple[float, float] = (0.5, 1.3)
    speckle_sigma_px: tuple[float, float] = (0.7, 1.1)
    speckle_temporal_corr: float = 0.85
    gamma: float = 0.8


# "shifted" is the differently-parametrised family for FID checks: wide sector, deep (small) heart,
# fine uncorrelated speckle, low contrast.
STYLES: dict[str, EchoStyle] = {
    "echonet": EchoStyle(),
    "shifted": EchoStyle(
        sector_half_angle_deg=(52.0, 60.0),
        depth_cm=(22.0, 26.0),
        gain=(1.3, 1.6),
        wall_level=(0.3, 0.4),
        tissue_level=(0.4, 0.5),
        blood_level=(0.18, 0.25),
        speckle_sigma_px=(0.35, 0.45),
        speckle_temporal_corr=0.0,
        gamma=1.3,
    ),
    # EF visible in a single frame (conditioning checks, issue 18): EDV nearly fixed, so the cavity size at any
    # phase follows ESV = EDV (1 - EF); the probe geometry varies little.
    "visible_ef": EchoStyle(
        depth_cm=(16.0, 16.5),
        gain=(0.95, 1.05),
        edv_mean_sd_clip=(115.0, 6.0, 100.0, 130.0),
        lv_aspect=(1.75, 1.85),
        tilt_rad=(-0.05, 0.05),
    ),
}


def _resolve_style(parametrisation: str | EchoStyle) -> tuple[str, EchoStyle]:
    if isinstance(parametrisation, EchoStyle):
        return repr(parametrisation), parametrisation
    if parametrisation not in STYLES:
        raise ValueError(f"parametrisation={parametrisation!r} is unknown; expected one of {sorted(STYLES)} or an EchoStyle")
    return parametrisation, STYLES[parametrisation]


def _video_rng(seed: int, style_key: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(style_key.encode()), index, stream])


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _cardiac_fraction(phase: np.ndarray, phase_es: float) -> np.ndarray:
    """1 at end-diastole (phase 0), 0 at end-systole (phase_es), smooth with zero slope at both."""
    phase = np.mod(phase, 1.0)
    systole = 0.5 * (1 + np.cos(np.pi * phase / phase_es))
    diastole = 0.5 * (1 - np.cos(np.pi * (phase - phase_es) / (1 - phase_es)))
    return np.where(phase < phase_es, systole, diastole)


def sample_video_params(seed: int, index: int, parametrisation: str | EchoStyle = "echonet",
                        num_frames: tuple[int, int] | None = None) -> dict:
    """All random choices of one synthetic video (pure function of seed, parametrisation, index)."""
    style_key, style = _resolve_style(parametrisation)
    rng = _video_rng(seed, style_key, index, 0)
    name = "0X" + "".join(f"{b:02X}" for b in _video_rng(seed, style_key, index, 1).bytes(8))
    ef_mean, ef_sd, ef_lo, ef_hi = style.ef_mean_sd_clip
    edv_mean, edv_sd, edv_lo, edv_hi = style.edv_mean_sd_clip
    ef = float(np.clip(rng.normal(ef_mean, ef_sd), ef_lo, ef_hi))
    edv = float(np.clip(rng.normal(edv_mean, edv_sd), edv_lo, edv_hi))
    if rng.uniform() < style.fps_typical_probability:
        fps = style.fps_typical
    else:
        fps = int(rng.integers(style.fps_other[0], style.fps_other[1] + 1))
    lo, hi = num_frames or style.num_frames
    if not 1 <= lo <= hi:
        raise ValueError(f"num_frames={num_frames!r}: expected (low, high) with 1 <= low <= high")
    n_frames = int(rng.integers(lo, hi + 1))
    heart_rate = _uniform(rng, style.heart_rate_bpm)
    cycle_frames = fps * 60.0 / heart_rate
    # End-systole lands exactly on a frame `es_offset` frames after the end-diastolic one.
    es_offset = max(1, round(0.36 * cycle_frames))
    if n_frames <= es_offset:
        n_frames = es_offset + 1
    ed_frame = int(rng.integers(0, n_frames - es_offset))
    return {
        "name": name, "index": index, "split": _SPLIT_PATTERN[index % len(_SPLIT_PATTERN)],
        "ef": ef, "edv": edv, "esv": edv * (1 - ef / 100.0), "fps": fps, "num_frames": n_frames,
        "heart_rate": heart_rate, "cycle_frames": cycle_frames, "phase_es": es_offset / cycle_frames,
        "ed_frame": ed_frame, "es_frame": ed_frame + es_offset,
        "depth_cm": _uniform(rng, style.depth_cm), "gain": _uniform(rng, style.gain),
        "half_angle": math.radians(_uniform(rng, style.sector_half_angle_deg)),
        "sector_radius": _uniform(rng, style.sector_radius_px),
        "apex_x": FRAME_SIZE / 2 + _uniform(rng, (-2.0, 2.0)), "apex_y": _uniform(rng, (-1.0, 3.0)),
        "heart_gap_px": _uniform(rng, (6.0, 12.0)), "tilt": _uniform(rng, style.tilt_rad),
        "lv_aspect": _uniform(rng, style.lv_aspect), "wall_cm": _uniform(rng, style.wall_cm),
        "rv_ef": _uniform(rng, (0.35, 0.55)), "wall_level": _uniform(rng, style.wall_level),
        "tissue_level": _uniform(rng, style.tissue_level), "blood_level": _uniform(rng, style.blood_level),
        "attenuation": _uniform(rng, style.attenuation), "speckle_sigma": _uniform(rng, style.speckle_sigma_px),
        "speckle_corr": style.speckle_temporal_corr, "gamma": style.gamma,
    }


def _lv_geometry(p: dict, volume_ml: np.ndarray) -> dict:
    """LV cavity semi-axes (pixels) and centre for the given volumes; V = 4/3 pi a b^2 in mL."""
    cm_per_px = p["depth_cm"] / FRAME_SIZE
    k = np.cbrt(np.asarray(volume_ml, dtype=np.float64) / p["edv"])
    b_ed = float(np.cbrt(3 * (p["edv"] / cm_per_px**3) / (4 * np.pi * p["lv_aspect"])))
    a_ed = p["lv_aspect"] * b_ed
    # Long axis shortens less than the short axis: a ~ k^0.6, b ~ k^1.2 keeps a*b^2 ~ k^3.
    long_semi, short_semi = a_ed * k**0.6, b_ed * k**1.2
    wall = p["wall_cm"] / cm_per_px
    septum_half = 0.5 / cm_per_px
    return {
        "a": long_semi, "b": short_semi, "a_ed": a_ed, "b_ed": b_ed, "wall": wall,
        "center_u": septum_half + b_ed, "center_v": wall + long_semi, "septum_half": septum_half,
        "cm_per_px": cm_per_px,
    }


def _heart_frame(p: dict) -> tuple[tuple, tuple, float, float]:
    """Unit vectors (u to the image right, v along the heart's long axis) and the heart origin."""
    # Python floats keep float32 image arrays float32 (numpy scalars would promote them).
    e_v = (math.sin(p["tilt"]), math.cos(p["tilt"]))
    e_u = (math.cos(p["tilt"]), -math.sin(p["tilt"]))
    origin_x = p["apex_x"] + p["heart_gap_px"] * e_v[0]
    origin_y = p["apex_y"] + p["heart_gap_px"] * e_v[1]
    return e_u, e_v, origin_x, origin_y


def _to_image(p: dict, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    e_u, e_v, ox, oy = _heart_frame(p)
    return ox + u * e_u[0] + v * e_v[0], oy + u * e_u[1] + v * e_v[1]


def lv_volumes(p: dict) -> np.ndarray:
    """LV volume (mL) at every frame of the video described by ``p``."""
    t = np.arange(p["num_frames"], dtype=np.float64)
    phase = (t - p["ed_frame"]) / p["cycle_frames"]
    return p["esv"] + (p["edv"] - p["esv"]) * _cardiac_fraction(phase, p["phase_es"])


def tracing_rows(p: dict, frame: int) -> list[list]:
    """EchoNet-style tracing of the LV at ``frame``: long axis, then 20 chords across it."""
    volume = lv_volumes(p)[frame]
    g = _lv_geometry(p, volume)
    a, b, cu, cv = float(g["a"]), float(g["b"]), float(g["center_u"]), float(g["center_v"])
    rows = []
    x1, y1 = _to_image(p, np.array(cu), np.array(cv - a))
    x2, y2 = _to_image(p, np.array(cu), np.array(cv + a))
    rows.append([float(x1), float(y1), float(x2), float(y2)])
    for i in range(NUM_CHORDS):
        v_rel = -a + (i + 0.5) * (2 * a / NUM_CHORDS)
        half = b * math.sqrt(max(0.0, 1 - (v_rel / a) ** 2))
        xa, ya = _to_image(p, np.array(cu - half), np.array(cv + v_rel))
        xb, yb = _to_image(p, np.array(cu + half), np.array(cv + v_rel))
        rows.append([float(xa), float(ya), float(xb), float(yb)])
    return [[f"{p['name']}.avi", *(round(c, 6) for c in r), frame] for r in rows]


def _signed_distance(u, v, cu, cv, semi_u, semi_v):
    """First-order signed distance (pixels) to an ellipse boundary; negative inside."""
    pu = (u - cu) / semi_u
    pv = (v - cv) / semi_v
    rho = np.sqrt(pu * pu + pv * pv) + 1e-6
    grad = np.sqrt((pu / semi_u) ** 2 + (pv / semi_v) ** 2) + 1e-6
    return (rho - 1) * rho / grad


def _speckle(rng: np.random.Generator, n: int, sigma: float, corr: float) -> np.ndarray:
    """Speckle of ``n`` frames, mean 1: a temporally correlated complex Gaussian field, blurred wider
    across the beam, its magnitude."""
    field = rng.standard_normal((n, 2, FRAME_SIZE, FRAME_SIZE), dtype=np.float32)
    for t in range(1, n):
        field[t] = corr * field[t - 1] + math.sqrt(1 - corr * corr) * field[t]
    speckle = np.empty((n, FRAME_SIZE, FRAME_SIZE), np.float32)
    for t in range(n):
        re = cv2.GaussianBlur(field[t, 0], (0, 0), sigmaX=1.4 * sigma, sigmaY=0.8 * sigma)
        im = cv2.GaussianBlur(field[t, 1], (0, 0), sigmaX=1.4 * sigma, sigmaY=0.8 * sigma)
        speckle[t] = np.sqrt(re * re + im * im)
    speckle /= speckle.mean() + 1e-6
    return speckle


def render_video(p: dict) -> np.ndarray:
    """Grayscale frames uint8 (T, 112, 112) of the video described by ``p`` (see sample_video_params)."""
    rng = _video_rng(p["seed"], p["style_key"], p["index"], 2)
    n = p["num_frames"]
    yy, xx = np.mgrid[0:FRAME_SIZE, 0:FRAME_SIZE].astype(np.float32) + 0.5
    rr = np.hypot(xx - p["apex_x"], yy - p["apex_y"])
    theta = np.arctan2(xx - p["apex_x"], yy - p["apex_y"])
    sector = (np.clip((p["half_angle"] - np.abs(theta)) * rr + 0.5, 0, 1)
              * np.clip(p["sector_radius"] - rr + 0.5, 0, 1)).astype(np.float32)

    e_u, e_v, ox, oy = _heart_frame(p)
    u = ((xx - ox) * e_u[0] + (yy - oy) * e_u[1])[None]
    v = ((xx - ox) * e_v[0] + (yy - oy) * e_v[1])[None]

    volumes = lv_volumes(p)
    frac = ((volumes - p["esv"]) / max(p["edv"] - p["esv"], 1e-6)).astype(np.float32)
    lv = _lv_geometry(p, volumes)

    def col(x):  # per-frame values broadcast over the image
        return np.asarray(x, dtype=np.float32).reshape(-1, 1, 1)

    a_lv, b_lv = col(lv["a"]), col(lv["b"])
    wall = lv["wall"]
    lv_cu, lv_cv = lv["center_u"], col(lv["center_v"])
    # RV follows the LV phase with its own ejection fraction.
    k_rv = col(np.cbrt(1 - p["rv_ef"] * (1 - frac)))
    a_rv, b_rv = 0.85 * lv["a_ed"] * k_rv**0.6, 0.75 * lv["b_ed"] * k_rv**1.2
    rv_cu = -(lv["septum_half"] + 0.75 * lv["b_ed"])
    rv_cv = wall + 0.15 * lv["a_ed"] + a_rv
    # Atria fill while the ventricles empty; they sit beyond the moving atrioventricular plane.
    grow = 1 + 0.2 * (1 - col(frac))
    lv_base = lv_cv + a_lv
    a_la, b_la = 0.42 * lv["a_ed"] * grow, 0.85 * lv["b_ed"] * grow
    la_cv = lv_base + 0.6 * wall + a_la
    rv_base = rv_cv + a_rv
    a_ra, b_ra = 0.4 * lv["a_ed"] * grow, 0.7 * lv["b_ed"] * grow
    ra_cv = rv_base + 0.6 * wall + a_ra

    chambers = [  # (distance field, wall thickness)
        (_signed_distance(u, v, lv_cu, lv_cv, b_lv, a_lv), wall * (1 + 0.35 * (1 - col(frac)))),
        (_signed_distance(u, v, rv_cu, rv_cv, b_rv, a_rv), 0.6 * wall),
        (_signed_distance(u, v, 0.95 * lv_cu, la_cv, b_la, a_la), 0.45 * wall),
        (_signed_distance(u, v, 0.95 * rv_cu, ra_cv, b_ra, a_ra), 0.45 * wall),
    ]
    inside = np.zeros((n, FRAME_SIZE, FRAME_SIZE), np.float32)
    wall_band = np.zeros_like(inside)
    nearest = np.full_like(inside, np.inf)
    for dist, thickness in chambers:
        # Polynomial ramps instead of exp: the same look at a fraction of the cost.
        inside = np.maximum(inside, np.clip(0.5 - dist, 0, 1))
        band = np.clip(1 - ((dist - thickness / 2) / (thickness / 2)) ** 2, 0, None)
        wall_band = np.maximum(wall_band, band * (2 - band))
        nearest = np.minimum(nearest, dist)
    # Tissue fades away from the heart; a bright pericardial layer surrounds it.
    far = np.clip(nearest - wall, 0, None)
    tissue = p["tissue_level"] * (0.45 + 0.55 * np.exp(-far / (1.5 * wall)))
    pericardium = 0.5 * np.exp(-(((nearest - 1.8 * wall) / (0.35 * wall)) ** 2))
    # Mitral leaflets: a bright line across the LV base while the valve is closed (systole).
    closed = col(np.clip(1 - frac * 1.5, 0, 1))
    leaflet = closed * np.exp(-(((v - lv_base) / 0.9) ** 2)) * (np.abs(u - lv_cu) < b_lv)
    image = (inside * p["blood_level"]
             + (1 - inside) * (tissue + p["wall_level"] * wall_band + pericardium * p["wall_level"])
             + 0.6 * leaflet)

    speckle = _speckle(rng, n, p["speckle_sigma"], p["speckle_corr"])
    depth = rr / FRAME_SIZE
    profile = p["gain"] * np.exp(-p["attenuation"] * depth) * (1 + 0.5 * depth)
    clutter = 0.35 * np.exp(-rr / 7.0)
    image = (image * profile + clutter) * speckle + 0.02 * speckle
    image = np.clip(image, 0, 1) ** p["gamma"] * sector
    return np.round(image * 255).astype(np.uint8)


def _write_one_video(task: tuple) -> tuple[list, list]:
    out_dir, seed, parametrisation, index, num_frames = task
    cv2.setNumThreads(1)
    style_key, _ = _resolve_style(parametrisation)
    p = sample_video_params(seed, index, parametrisation, num_frames)
    p.update(seed=seed, style_key=style_key)
    frames = render_video(p)
    path = Path(out_dir) / "Videos" / f"{p['name']}.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), float(p["fps"]), (FRAME_SIZE, FRAME_SIZE))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV could not open an MJPG writer for {path}")
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    writer.release()
    row = [p["name"], p["ef"], p["esv"], p["edv"], FRAME_SIZE, FRAME_SIZE, p["fps"], p["num_frames"], p["split"]]
    # EchoNet lists the smaller (end-systolic) tracing first, the end-diastolic one last.
    tracings = tracing_rows(p, p["es_frame"]) + tracing_rows(p, p["ed_frame"])
    return row, tracings


def write_synthetic_echonet(out_dir: str | os.PathLike, num_videos: int = 200, seed: int = 0,
                            parametrisation: str | EchoStyle = "echonet", num_workers: int | None = None,
                            num_frames: tuple[int, int] | None = None, overwrite: bool = False,
                            progress: bool = False) -> Path:
    """Write a synthetic folder in EchoNet-Dynamic's layout; returns its path.

    ``parametrisation`` picks a style family (``"echonet"`` default, ``"shifted"`` for a visibly different
    set) or takes an :class:`EchoStyle`; ``num_frames=(low, high)`` overrides the frame-count range.
    """
    if not isinstance(num_videos, int) or num_videos < 1:
        raise UserInputError(f"num_videos={num_videos!r}: expected a positive integer")
    _resolve_style(parametrisation)
    out = Path(out_dir)
    ours = [out / "FileList.csv", out / "VolumeTracings.csv"]
    videos_dir = out / "Videos"
    existing = [p for p in ours if p.exists()] + (sorted(videos_dir.glob("*.avi")) if videos_dir.is_dir() else [])
    if existing and not overwrite:
        raise OutputExistsError(f"out_dir={str(out)!r} already holds an EchoNet-layout folder "
                              f"({existing[0].name} ...); pass overwrite=True to replace it")
    for path in existing:
        path.unlink()
    videos_dir.mkdir(parents=True, exist_ok=True)

    tasks = [(str(out), seed, parametrisation, i, num_frames) for i in range(num_videos)]
    workers = min(num_workers if num_workers is not None else (os.cpu_count() or 1), num_videos)
    if workers <= 1:
        results = list(map(_write_one_video, tasks))
    else:
        with ProcessPoolExecutor(workers, mp_context=worker_context()) as pool:
            results = list(pool.map(_write_one_video, tasks, chunksize=max(1, num_videos // (4 * workers))))
    rows = sorted((r for r, _ in results), key=lambda r: r[0])
    names = [r[0] for r in rows]
    if len(set(names)) != len(names):
        raise RuntimeError("synthetic video names collided; use another seed")
    by_name = {row[0]: traced for row, traced in results}
    tracings = [t for name in names for t in by_name[name]]
    # What the folder is, for the builder's record and the model cards (not EchoNet-Dynamic data).
    atomic_write_json(out / SYNTHETIC_MARKER, {"source": "synthetic", "generator": "pipelines.data.synthetic_echonet",
                                               "num_videos": num_videos, "seed": seed,
                                               "parametrisation": parametrisation if isinstance(parametrisation, str) else "custom EchoStyle"})
    # FileList.csv last (and each CSV atomically): its presence marks a complete folder.
    for name, header, body in (("VolumeTracings.csv", TRACING_COLUMNS, tracings), ("FileList.csv", FILELIST_COLUMNS, rows)):
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(header)
        writer.writerows(body)
        atomic_write(out / name, lambda handle, text=text: handle.write(text.getvalue().encode()))
    if progress:
        print(f"wrote {num_videos} synthetic videos to {out}")
    return out


def synthetic_frames(num_images: int, seed: int = 0, parametrisation: str | EchoStyle = "echonet",
                     resolution: int = 64, frames_per_video: int = 4,
                     num_frames: Sequence[int] | None = (30, 40)) -> np.ndarray:
    """uint8 (N, 1, R, R) frames rendered straight from the generator (no files), e.g. for FID checks."""
    style_key, _ = _resolve_style(parametrisation)
    images = []
    index = 0
    while len(images) < num_images:
        p = sample_video_params(seed, index, parametrisation, tuple(num_frames) if num_frames else None)
        p.update(seed=seed, style_key=style_key)
        video = render_video(p)
        pick = _video_rng(seed, style_key, index, 3).choice(len(video), min(frames_per_video, len(video)), replace=False)
        for k in np.sort(pick):
            frame = video[k]
            if resolution != FRAME_SIZE:
                frame = cv2.resize(frame, (resolution, resolution), interpolation=cv2.INTER_AREA)
            images.append(frame)
        index += 1
    return np.stack(images[:num_images])[:, None]
