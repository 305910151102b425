"""One atomic checkpoint scheme for every training loop (diffusion training, DG discriminator, Table 2 classifiers).

A checkpoint is a numbered folder ``<root>/<prefix><number>``. It is written into a hidden temporary
folder ``<root>/.tmp-<prefix><number>``; its state file (JSON) is written last, everything is fsynced,
and the folder is renamed into place. A killed save therefore leaves only a ``.tmp-`` folder, which is
never listed as a checkpoint and is deleted by ``remove_partial`` on the next start. Weights and
optimizer state are safetensors (accelerate adds its own RNG state files to training checkpoints).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipelines.training.config import (
    MODEL,
    RUN,
    ConfigError,
    TrainConfig,
    default_value,
    fields_with_resume_role,
)
from pipelines.utils import fsync_dir, fsync_tree, jsonable

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
TRAINING_STATE_FILE = "training_state.json"
EMA_FILE = "ema.safetensors"
PHEMA_FILE = "phema.safetensors"


def is_complete_checkpoint(path: Path, state_file: str) -> bool:
    return path.is_dir() and (path / state_file).is_file() and not path.name.startswith(TMP_PREFIX)


def read_state_file(file: Path) -> dict[str, Any]:
    """A checkpoint's JSON state; a damaged one is a ConfigError naming it."""
    try:
        state = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{file}: not a readable checkpoint state ({err}); the checkpoint is damaged, "
                          f"resume from another one") from err
    if not isinstance(state, dict):
        raise ConfigError(f"{file}: expected a JSON object, got {type(state).__name__}; the checkpoint is damaged")
    return state


@dataclass(frozen=True)
class CheckpointStore:
    """Numbered checkpoint folders ``root/<prefix><number, zero-padded to digits>``."""

    root: Path
    prefix: str
    digits: int
    state_file: str = "state.json"

    def path(self, number: int) -> Path:
        return self.root / f"{self.prefix}{number:0{self.digits}d}"

    def temp_path(self, number: int) -> Path:
        return self.root / f"{TMP_PREFIX}{self.path(number).name}"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints (number, folder), oldest first; temporary folders are ignored."""
        if not self.root.is_dir():
            return []
        pattern = re.compile(rf"{re.escape(self.prefix)}(\d+)")
        found = []
        for child in self.root.iterdir():
            match = pattern.fullmatch(child.name)
            if match and is_complete_checkpoint(child, self.state_file):
                found.append((int(match.group(1)), child))
        return sorted(found)

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1][1] if found else None

    def read_state(self, path: Path) -> dict[str, Any]:
        return read_state_file(Path(path) / self.state_file)

    def remove_partial(self) -> list[Path]:
        """Deletes the leftovers of killed saves (call it from one process only)."""
        removed = []
        if self.root.is_dir():
            for child in self.root.iterdir():
                if child.name.startswith(TMP_PREFIX):
                    shutil.rmtree(child, ignore_errors=True)
                    removed.append(child)
        for leftover in removed:
            logger.warning("removed %s, left by a save that did not finish", leftover)
        return removed

    def begin(self, number: int) -> Path:
        """A fresh, empty temporary folder for checkpoint ``number``."""
        tmp = self.temp_path(number)
        self.root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        return tmp

    def commit(self, number: int, state: dict[str, Any], total_limit: int | None = None) -> Path:
        """Writes the state file last, fsyncs, renames the temporary folder into place, prunes old ones."""
        tmp, final = self.temp_path(number), self.path(number)
        (tmp / self.state_file).write_text(json.dumps(state, indent=2))
        replace_folder(tmp, final)  # the same point saved again (e.g. reached after resuming from an older one)
        if total_limit is not None:
            for _, old in self.checkpoints()[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def save(self, number: int, write: Callable[[Path], None], state: dict[str, Any],
             total_limit: int | None = None) -> Path:
        """One-process save: ``write(temporary folder)`` puts the files in, then :meth:`commit`."""
        write(self.begin(number))
        return self.commit(number, state, total_limit)


def replace_folder(tmp: Path, final: Path) -> None:
    """fsyncs the finished folder ``tmp`` and renames it to ``final`` (replacing an existing one): a kill
    leaves either the old folder or the new one complete, plus ``.tmp-`` leftovers that ``remove_partial`` deletes."""
    fsync_tree(tmp)
    trash = final.parent / f"{TMP_PREFIX}replaced-{final.name}"
    if final.exists():
        os.rename(final, trash)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(trash, ignore_errors=True)


def epoch_checkpoints(out_dir: str | os.PathLike) -> CheckpointStore:
    """``out_dir/checkpoints/epoch-NNN``: one checkpoint per finished epoch (discriminator, classifiers)."""
    return CheckpointStore(Path(out_dir) / "checkpoints", "epoch-", 3)


# --------------------------------------------------------------------------------------------------
# optimizer state as safetensors (tensors) + JSON metadata (hyper-parameters and scalars), never pickle


def save_optimizer_state(optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> None:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    metadata = {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}
    save_file(tensors, str(path), metadata=metadata)


def load_optimizer_state(optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "param_groups" not in metadata:
        raise ValueError(f"{path}: not an optimizer state written by save_optimizer_state")
    tensors = load_file(str(path))
    state: dict[int, dict[str, Any]] = {}
    for name, value in list(tensors.items()) + list(json.loads(metadata["scalars"]).items()):
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = json.loads(metadata["param_groups"])
    for group in groups:  # JSON turned tuples (Adam's betas) into lists
        for key, value in group.items():
            if key != "params" and isinstance(value, list):
                group[key] = tuple(value)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# --------------------------------------------------------------------------------------------------
# diffusion training: accelerate save_state (every process) + the EMA + progress


def training_checkpoints(output_dir: str | os.PathLike) -> CheckpointStore:
    """``<output_dir>/checkpoints/checkpoint-<images seen, 12 digits>``."""
    return CheckpointStore(Path(output_dir) / "checkpoints", "checkpoint-", 12, TRAINING_STATE_FILE)


def save_training_checkpoint(accelerator, store: CheckpointStore, ema, state: dict[str, Any],
                             total_limit: int | None, phema=None) -> Path:
    """Atomic ``save_state`` + ``ema.safetensors`` (+ ``phema.safetensors``, the post-hoc EMA profiles) at
    ``state["images_seen"]``; every process calls it (each writes its RNG state). Returns the final folder."""
    number = state["images_seen"]
    if accelerator.is_main_process:
        store.begin(number)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(store.temp_path(number)))
    if accelerator.is_main_process:
        ema.save(str(store.temp_path(number) / EMA_FILE))
        if phema is not None:
            phema.save(str(store.temp_path(number) / PHEMA_FILE))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        store.commit(number, state, total_limit)
    accelerator.wait_for_everyone()
    return store.path(number)


def load_training_checkpoint(accelerator, path: Path, ema, phema=None, accept_inexact: bool = False) -> dict[str, Any]:
    """Restores model, optimizer, grad scaler and RNG states (accelerate), the EMA, and returns the progress
    (``path``: a complete checkpoint, as ``train`` checks before it builds anything). A damaged file is a
    ConfigError naming it; an RNG state that cannot be restored is one too, unless ``accept_inexact``."""
    state = read_state_file(path / TRAINING_STATE_FILE)
    missing = [key for key in ("images_seen", "step", "nonfinite_steps", "world_size") if key not in state]
    if missing:
        raise ConfigError(f"{path / TRAINING_STATE_FILE}: missing {missing}; the checkpoint is damaged")
    _check_rng_state(accelerator, path, state["world_size"], accept_inexact)
    try:
        accelerator.load_state(str(path))
    except Exception as err:  # accelerate does not say which file failed: find it
        raise ConfigError(_load_failure(path, err)) from err
    _load_weights(ema.load, path / EMA_FILE)
    if phema is not None:
        if not (path / PHEMA_FILE).is_file():
            raise ConfigError(f"--resume_from_checkpoint {path}: no {PHEMA_FILE} (a run without --phema)")
        _load_weights(phema.load, path / PHEMA_FILE)
    return state


def _check_rng_state(accelerator, path: Path, saved_world_size: int, accept_inexact: bool) -> None:
    """accelerate only logs (at INFO) an RNG state it cannot load; the dropout streams would then silently restart."""
    from accelerate.utils.other import load

    file = path / f"random_states_{accelerator.process_index}.pkl"
    if saved_world_size != accelerator.num_processes:
        logger.warning("%s was saved by %d processes, this run has %d: the dropout streams restart, so the run is "
                       "not the uninterrupted one", path, saved_world_size, accelerator.num_processes)
        return
    try:
        load(file)  # accelerate's own reader (weights_only, numpy's RNG allow-listed)
        return
    except Exception as err:
        problem = f"{file}: cannot restore the RNG state ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
    if not accept_inexact:
        raise ConfigError(f"{problem}; resuming would not continue the run exactly. Resume from another checkpoint, "
                          f"or pass --accept_inexact_resume to go on with fresh random streams")
    logger.warning("%s; --accept_inexact_resume: going on with fresh random streams (not the uninterrupted run)",
                   problem)


def _load_weights(load: Callable[[str], None], file: Path) -> None:
    try:
        load(str(file))
    except Exception as err:
        raise ConfigError(f"{file}: cannot be loaded ({_first_line(err)}); the checkpoint is damaged or from "
                          f"another model") from err


def _first_line(err: BaseException) -> str:
    """The error's type and its first two lines (torch's load_state_dict puts the detail on the second)."""
    text = " ".join(line.strip() for line in str(err).strip().splitlines()[:2])
    return f"{type(err).__name__}: {text[:300]}"


def _load_failure(path: Path, err: BaseException) -> str:
    """The message for a failed ``accelerator.load_state``: the first file that does not read, else the model's fit."""
    from accelerate.utils.other import load

    readers = [(path / "model.safetensors", load_file)] + [(file, load) for file in sorted(path.glob("*.bin"))]
    for file, read in readers:
        if not file.is_file():
            return f"--resume_from_checkpoint {path}: {file.name} is missing; the checkpoint is damaged"
        try:
            read(str(file))
        except Exception as read_err:
            return f"{file}: cannot be read ({_first_line(read_err)}); the checkpoint is damaged"
    return (f"{path / 'model.safetensors'}: does not fit this run's network ({_first_line(err)}); was it trained "
            f"on another resolution or channel count?")


def check_resume_data(state: dict[str, Any], data: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    """Refuses a checkpoint of another image size, or one already past ``--duration_kimg``; another dataset
    (``data``: this run's ``resolution``, ``channels``, ``dataset_fingerprint``) needs ``--accept_inexact_resume``."""
    for key in ("resolution", "channels"):
        if key in state and state[key] != data[key]:
            raise ConfigError(f"--resume_from_checkpoint {path}: it was trained on {key} {state[key]}, the dataset "
                              f"{cfg.dataset} has {data[key]}")
    saved = state.get("dataset_fingerprint")
    if saved is not None and saved != data["dataset_fingerprint"]:
        message = (f"--resume_from_checkpoint {path}: --dataset {cfg.dataset} is not the dataset the checkpoint "
                   f"trained on (fingerprint {data['dataset_fingerprint'][:12]}, saved {saved[:12]})")
        if not cfg.accept_inexact_resume:
            raise ConfigError(message + "; pass --accept_inexact_resume to continue on it anyway")
        logger.warning("%s; --accept_inexact_resume: continuing on it", message)
    saved_duration = state.get("config", {}).get("duration_kimg")
    if state.get("images_seen", 0) >= cfg.duration_nimg and saved_duration != cfg.duration_nimg / 1000:
        raise ConfigError(f"--duration_kimg {cfg.duration_nimg / 1000:g}: the checkpoint {path.name} has already "
                          f"trained {state['images_seen'] / 1000:g} kimg (its run: {saved_duration} kimg); ask for "
                          f"a longer duration, or use its exported pipeline")


def check_resume_compatible(saved: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    """Refuses a checkpoint of another model; warns when run settings changed (the run is then not the
    uninterrupted one)."""
    current = jsonable(cfg.to_dict())  # tuples -> lists, as saved
    # A setting newer than the checkpoint (e.g. recipe, phema) had its declared default then.
    saved = {**jsonable({k: default_value(k) for k in current if k not in saved}), **saved}
    for key in fields_with_resume_role(MODEL):
        if saved.get(key) != current.get(key) and not (key in ("resolution", "channels") and current.get(key) is None):
            raise ConfigError(
                f"--resume_from_checkpoint {path}: it was trained with {key}={saved.get(key)!r}, "
                f"this run asks for {current.get(key)!r}"
            )
    changed = [k for k in fields_with_resume_role(RUN) if saved.get(k) != current.get(k)]
    if changed:
        logger.warning("resuming %s with changed settings %s: the run is no longer the uninterrupted one",
                       path, {k: (saved.get(k), current.get(k)) for k in changed})
