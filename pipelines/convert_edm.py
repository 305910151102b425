"""Convert an NVlabs EDM network (`SongUNet` / `DhariwalUNet`) into our diffusers model folder.

Our models keep EDM's module names, so the name table is the identity, with three documented rules
(see ``docs/edm_checkpoint_mapping.md``):
- a leading ``model.`` (the EDM preconditioning wrapper's attribute) is stripped;
- ``*.resample_filter`` buffers are not weights: they are checked against the config, then dropped;
- ``map_augment.weight`` (EDM's augmentation conditioning, unused by the paper) is refused unless
  ``drop_augment=True`` (it only acts when augment labels are passed, so sampling is unaffected).
Every other tensor must match a parameter/buffer of the same name and shape; anything unknown,
missing or mis-shaped is refused, naming the key, before anything is written.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import json
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from pipelines.errors import MissingInputError, UserInputError
from pipelines.networks import ARCHITECTURES, network_config

logger = logging.getLogger(__name__)

_BLOCK_KEY = re.compile(r"^(enc|dec)\.(\d+)x(\d+)_([a-z_]+?)(\d*)\.(.+)$")
# EDM constructor arguments that are our config fields under another name (or the same name).
_EDM_KWARG_NAMES = {
    "img_resolution": "sample_size", "in_channels": "in_channels", "out_channels": "out_channels",
    "label_dim": "label_dim", "model_channels": "model_channels", "channel_mult": "channel_mult",
    "channel_mult_emb": "channel_mult_emb", "num_blocks": "num_blocks", "attn_resolutions": "attn_resolutions",
    "dropout": "dropout", "label_dropout": "label_dropout", "embedding_type": "embedding_type",
    "channel_mult_noise": "channel_mult_noise", "encoder_type": "encoder_type", "decoder_type": "decoder_type",
    "resample_filter": "resample_filter",
}


class EDMConversionError(UserInputError):
    """The EDM checkpoint does not match the expected layout; the message names the offending key(s)."""


def load_edm_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Read ``path`` -> (network state_dict, EDM constructor kwargs or None).

    ``.pt``/``.pth`` state_dicts are read with ``torch.load(weights_only=True)``; ``.safetensors`` too.
    ``.pkl`` (EDM ``network-snapshot-*.pkl``) is read by :class:`EDMSnapshotUnpickler`, which runs none of
    the code such a pickle carries: no EDM checkout is needed, and a crafted pickle is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"EDM checkpoint {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".pt", ".pth"):
            state = torch.load(path, map_location="cpu", weights_only=True)
            return _as_state_dict(state, path), None
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return _strip_wrapper_prefix(load_file(str(path))), None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, SafetensorError) as err:
        raise EDMConversionError(f"{str(path)!r} cannot be read as a {suffix} state_dict "
                                 f"({type(err).__name__}: {err})") from err
    if suffix == ".pkl":
        return _load_edm_pickle(path)
    raise EDMConversionError(f"{str(path)!r}: expected a .pt/.pth state_dict, .safetensors or EDM .pkl snapshot")


def _as_state_dict(state: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise EDMConversionError(
            f"{str(path)!r}: expected a state_dict (a dict of name -> tensor) saved from an EDM SongUNet/DhariwalUNet "
            "or its preconditioning wrapper, e.g. torch.save(net.state_dict(), path)"
        )
    return _strip_wrapper_prefix(state)


def _strip_wrapper_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if all(key.startswith("model.") for key in state):  # saved from EDMPrecond / VPPrecond / VEPrecond
        return {key[len("model."):]: value for key, value in state.items()}
    return dict(state)


# ---------------------------------------------------------------------------------------------------
# EDM snapshots without running them. EDM's torch_utils.persistence pickles each network object as a call
# _reconstruct_persistent_obj(meta), meta = {type, version, module_src (the class's source), class_name,
# state (the object's __dict__)}; unpickling normally execs module_src. Here each such call becomes a
# _PersistentRecord holding class_name and state, torch.nn containers become _ModuleRecord, tensors are
# rebuilt by torch's own weights-only code, and any other global is refused by name.


class _PersistentRecord:
    """An EDM persistent object as data: its class name and ``__dict__`` (the embedded source is ignored)."""

    def __init__(self, meta: Any):
        if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
            raise EDMConversionError("an EDM persistence record lacks its type / state: not an EDM snapshot")
        self.class_name = str(meta.get("class_name"))
        self.state = meta["state"]


class _ModuleRecord:
    """A plain torch.nn container (ModuleDict, Sequential, ...) as data: only its ``__dict__`` is kept."""

    state: dict

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {}


def _storage_from_bytes(data: bytes):
    # EDM pickled tensors with pickle, not torch.save: each storage is a nested legacy torch.save blob.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    # protocol 2 writes bytes as _codecs.encode(text, "latin1"); nothing else of codecs is reachable
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise EDMConversionError(f"_codecs.encode with {encoding!r}: not part of an EDM network snapshot")
    return text.encode("latin1")


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, *metadata):
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, collections.OrderedDict())


def _rebuild_parameter(data, *_requires_grad_hooks_state):
    return data


def _rebuild_from_type(func, new_type, args, state):
    return func(*args)  # func was itself vetted by find_class; the subclass type is dropped


def _reconstructor(cls, base, state):
    if cls is not _ModuleRecord:
        raise EDMConversionError(f"copyreg._reconstructor of {cls!r}: not part of an EDM snapshot")
    return _ModuleRecord.__new__(_ModuleRecord)


_ALLOWED_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _PersistentRecord,
    ("dnnlib.util", "EasyDict"): dict,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("builtins", "object"): object,
    ("_codecs", "encode"): _latin1_bytes,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("torch.nn.parameter", "Parameter"): torch.Tensor,
}


class EDMSnapshotUnpickler(pickle.Unpickler):
    """Reads an EDM ``network-snapshot-*.pkl`` as data; a global outside EDM's format is an error naming it."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:  # protocol 2 spells Python 2's names (__builtin__.set)
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is not None:
            return found
        if module.startswith("torch.nn.modules.") and name.isidentifier():
            return _ModuleRecord  # never the real class: nothing of it runs
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise EDMConversionError(f"refusing global {module}.{name}: not part of an EDM network snapshot "
                                 "(a pickle naming it could run code)")

    def persistent_load(self, pid: Any) -> Any:
        raise EDMConversionError(f"persistent id {str(pid)[:60]!r}: not an EDM network snapshot (written with "
                                 "pickle.dump); a torch.save file should be a .pt")


def _record_state_dict(record: Any, where: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """The ``state_dict()`` of a recorded module: parameters, persistent buffers, then children, by name."""
    if not isinstance(record, (_PersistentRecord, _ModuleRecord)):
        raise EDMConversionError(f"{where}: {prefix or 'the network'} is a {type(record).__name__}, not a module")
    state = record.state
    skipped = state.get("_non_persistent_buffers_set") or set()
    out: dict[str, torch.Tensor] = {}
    for kind in ("_parameters", "_buffers"):
        for name, value in (state.get(kind) or {}).items():
            if value is None or (kind == "_buffers" and name in skipped):
                continue
            if not isinstance(value, torch.Tensor):
                raise EDMConversionError(f"{where}: {prefix}{name} is a {type(value).__name__}, not a tensor")
            out[prefix + name] = value.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(_record_state_dict(child, where, f"{prefix}{name}."))
    return out


def _load_edm_pickle(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    try:
        with open(path, "rb") as handle:
            data = EDMSnapshotUnpickler(handle).load()
    except EDMConversionError as err:
        raise EDMConversionError(f"{str(path)!r}: {err}") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, RuntimeError) as err:
        raise EDMConversionError(f"{str(path)!r} is not a readable EDM snapshot ({type(err).__name__}: {err})") from err
    net = data.get("ema", data.get("net")) if isinstance(data, dict) else data
    if not isinstance(net, _PersistentRecord):
        raise EDMConversionError(f"{str(path)!r}: expected an EDM snapshot dict with an 'ema' network")
    unet = (net.state.get("_modules") or {}).get("model", net)  # unwrap the preconditioning wrapper
    init_kwargs = unet.state.get("_init_kwargs") if isinstance(unet, _PersistentRecord) else None
    if init_kwargs is not None and not isinstance(init_kwargs, dict):
        raise EDMConversionError(f"{str(path)!r}: the network's _init_kwargs is not a dict")
    return _record_state_dict(unet, str(path)), (dict(init_kwargs) if init_kwargs is not None else None)


def _family(state: dict[str, torch.Tensor]) -> str:
    if "out_conv.weight" in state:
        return "adm"
    if any(key.startswith("dec.") and "_aux_conv." in key for key in state):
        return "song"
    raise EDMConversionError(
        "state_dict is neither an EDM DhariwalUNet (no key 'out_conv.weight') nor a SongUNet "
        "(no key 'dec.<R>x<R>_aux_conv.weight')"
    )


def _require(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise EDMConversionError(f"missing key {key!r}: cannot infer the network configuration")
    return state[key]


def _filter_taps(filter_2d: torch.Tensor) -> tuple[int | float, ...]:
    # The buffer is outer(f, f) / sum(f)^2; its first row is proportional to f with f[0] = 1 for EDM's filters.
    row = filter_2d.reshape(filter_2d.shape[-2], filter_2d.shape[-1])[0].double()
    taps = row / row[0]
    return tuple(int(round(v)) if abs(v - round(v)) < 1e-4 else float(v) for v in taps.tolist())


def infer_edm_config(state: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
    """Read (arch, our config) off an EDM network state_dict's names and shapes.

    arch is "adm", or "ddpmpp"/"ncsnpp" for SongUNet by its noise embedding. Not recoverable from weights
    (keep defaults unless overridden): dropout, label_dropout, fourier_scale (the frequencies themselves
    are loaded), ADM channels_per_head (64 in EDM).
    """
    family = _family(state)
    levels: dict[int, set[str]] = {}
    enc_blocks: dict[int, set[int]] = {}
    attn: set[int] = set()
    for key in state:
        match = _BLOCK_KEY.match(key)
        if not match:
            continue
        side, res, _, kind, idx, rest = match.groups()
        res = int(res)
        if side == "enc":
            levels.setdefault(res, set()).add(kind)
            if kind == "block" and idx:
                enc_blocks.setdefault(res, set()).add(int(idx))
                if rest.startswith("qkv."):
                    attn.add(res)
    if not levels:
        raise EDMConversionError("state_dict has no 'enc.<R>x<R>_...' keys: not an EDM UNet")
    resolutions = sorted(levels, reverse=True)
    top = resolutions[0]
    stem = _require(state, f"enc.{top}x{top}_conv.weight")
    map0 = _require(state, "map_layer0.weight")
    emb_channels, noise_channels = map0.shape
    model_channels = int(noise_channels) if family == "adm" else int(stem.shape[0])
    channel_mult = tuple(
        int(_require(state, f"enc.{r}x{r}_block0.conv0.weight").shape[0]) // model_channels for r in resolutions
    )
    config: dict[str, Any] = dict(
        sample_size=top, in_channels=int(stem.shape[1]), model_channels=model_channels, channel_mult=channel_mult,
        channel_mult_emb=int(emb_channels) // model_channels, num_blocks=len(enc_blocks.get(top, ())),
        attn_resolutions=tuple(sorted(attn, reverse=True)),
        label_dim=int(state["map_label.weight"].shape[1]) if "map_label.weight" in state else 0,
    )
    filters = [value for key, value in state.items() if key.endswith(".resample_filter")]
    if filters:
        config["resample_filter"] = _filter_taps(filters[0])
    if family == "adm":
        config["out_channels"] = int(state["out_conv.weight"].shape[0])
        return "adm", config

    aux_convs = [key for key in state if key.startswith("dec.") and key.endswith("_aux_conv.weight")]
    config.update(
        out_channels=int(state[aux_convs[0]].shape[0]),
        channel_mult_noise=int(noise_channels) // model_channels,
        embedding_type="fourier" if "map_noise.freqs" in state else "positional",
        encoder_type="residual" if any("_aux_residual." in k for k in state)
        else "skip" if any("_aux_skip." in k for k in state) else "standard",
        decoder_type="skip" if len(aux_convs) > 1 else "standard",
    )
    return ("ncsnpp" if config["embedding_type"] == "fourier" else "ddpmpp"), config


def _config_from_edm_kwargs(init_kwargs: dict[str, Any]) -> dict[str, Any]:
    config = {ours: init_kwargs[edm] for edm, ours in _EDM_KWARG_NAMES.items() if edm in init_kwargs}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def map_edm_state_dict(
    state: dict[str, torch.Tensor], model: torch.nn.Module, drop_augment: bool = False
) -> dict[str, torch.Tensor]:
    """Map EDM names onto ``model``'s (identity, rules in the module docstring); refuse any mismatch."""
    expected = model.state_dict()
    derived_buffers = {name: buf for name, buf in model.named_buffers() if name.endswith(".resample_filter")}
    mapped: dict[str, torch.Tensor] = {}
    unknown, misshaped, bad_filters = [], [], []
    for key, tensor in state.items():
        if key == "map_augment.weight":
            if not drop_augment:
                raise EDMConversionError(
                    "key 'map_augment.weight': the EDM network was trained with augmentation labels "
                    "(augment_dim > 0), which our models do not have; pass drop_augment=True "
                    "(--drop_augment) to drop it (it only acts when augment labels are given)"
                )
            logger.warning("dropping 'map_augment.weight' (augmentation conditioning)")
        elif key in derived_buffers:
            ours = derived_buffers[key]
            if tuple(tensor.shape) != tuple(ours.shape) or not torch.allclose(tensor.float(), ours.float()):
                bad_filters.append(key)
        elif key not in expected:
            unknown.append(key)
        elif tuple(tensor.shape) != tuple(expected[key].shape):
            misshaped.append(f"{key} {tuple(tensor.shape)} (expected {tuple(expected[key].shape)})")
        else:
            mapped[key] = tensor
    missing = sorted(set(expected) - set(mapped))
    problems = [
        (label, items) for label, items in (
            ("unknown key(s)", unknown), ("missing key(s)", missing), ("mis-shaped tensor(s)", misshaped),
            ("resample_filter(s) not matching the config's resample_filter", bad_filters),
        ) if items
    ]
    if problems:
        lines = [f"{label}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}" for label, items in problems]
        raise EDMConversionError("EDM checkpoint does not match the network layout; nothing converted.\n"
                                 + "\n".join(lines))
    return mapped


def convert_edm_state_dict(
    state: dict[str, torch.Tensor], arch: str | None = None, init_kwargs: dict[str, Any] | None = None,
    drop_augment: bool = False, **config_overrides,
) -> torch.nn.Module:
    """EDM state_dict -> our model with the weights loaded. The config is inferred from the tensors, then
    updated from EDM's constructor kwargs (pickles), then from ``config_overrides``."""
    state = _strip_wrapper_prefix(state)
    inferred_arch, config = infer_edm_config(state)
    if arch is not None:
        if arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
        if arch != inferred_arch:
            raise EDMConversionError(f"arch={arch!r} given, but the checkpoint's tensors are a {inferred_arch!r} network")
    if init_kwargs:
        config.update(_config_from_edm_kwargs(init_kwargs))
    config.update(config_overrides)
    arch = inferred_arch
    model_class = ARCHITECTURES[arch].model_class
    resolution, channels = config.pop("sample_size"), config.pop("in_channels")
    full_config = network_config(arch, resolution=resolution, channels=channels, **config)
    try:
        model = model_class(**full_config)
    except ValueError as error:
        raise EDMConversionError(f"inferred config {full_config} is not buildable: {error}") from error
    mapped = map_edm_state_dict(state, model, drop_augment=drop_augment)
    model.load_state_dict({k: v.to(torch.float32) for k, v in mapped.items()}, strict=True)
    return model.eval()


def convert_edm_checkpoint(
    src: str | Path, out_dir: str | Path, arch: str | None = None, drop_augment: bool = False, **config_overrides,
) -> torch.nn.Module:
    """Convert the EDM checkpoint at ``src`` and ``save_pretrained`` it (safetensors) into ``out_dir``."""
    state, init_kwargs = load_edm_checkpoint(src)
    model = convert_edm_state_dict(state, arch=arch, init_kwargs=init_kwargs, drop_augment=drop_augment,
                                   **config_overrides)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    logger.info("wrote %s (%s, %s)", out_dir, type(model).__name__, json.dumps(dict(model.config)))
    return model


__all__ = [
    "EDMConversionError", "EDMSnapshotUnpickler", "load_edm_checkpoint", "infer_edm_config", "map_edm_state_dict",
    "convert_edm_state_dict", "convert_edm_checkpoint",
]
