"""The training configuration: every setting declared once, with its help text.

``TrainConfig``'s fields carry their help, their argparse group and, where it applies, their choices and
their role on resume (``dataclasses.field(metadata=...)``). From them come the ``train_unconditional.py``
parser (:func:`build_parser`), its inverse (:func:`config_to_cli_args`, used by the sweep to launch
training in a subprocess), the mapping check of the sweep (:func:`config_from_dict`) and
:func:`validate_config`. Flag ``--name`` sets field ``name``; a boolean that defaults to True (or that a recipe turns on) is turned
off with ``--no_name``; an optional value takes ``none``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.cli import finite_float_arg, json_object_arg, make_parser
from pipelines.components.preconditioning import PRECONDITIONINGS
from pipelines.errors import UserInputError

# Table 1 of the paper: images seen per architecture, in thousands.
PAPER_DURATION_KIMG = {"adm": 30106.0, "ddpmpp": 60211.0, "ncsnpp": 60211.0}
RECIPES = ("edm", "edm2")
# NVlabs edm2 train_edm2.py, presets edm2-img64-*: (ref lr, dropout, duration in images).
EDM2_IMG64 = {"edm2-xs": (0.0120, 0.00, 1024 << 20), "edm2-s": (0.0100, 0.00, 1024 << 20),
              "edm2-m": (0.0090, 0.10, 2048 << 20), "edm2-l": (0.0080, 0.10, 1024 << 20),
              "edm2-xl": (0.0070, 0.10, 640 << 20)}
# What --recipe edm2 sets besides the preset's lr, dropout and duration (train_edm2.py and its training
# loop: batch 2048, lr / sqrt(max(t / 35000 batches, 1)), 10 Mimg ramp-up, Adam betas (0.9, 0.99),
# ln(sigma) ~ N(-0.8, 1.6^2), post-hoc EMA instead of a ramped one).
EDM2_RECIPE = dict(batch_size=2048, lr_ref_batches=35000.0, lr_rampup_kimg=10000.0, adam_beta1=0.9,
                   adam_beta2=0.99, p_mean=-0.8, p_std=1.6, ema_rampup_ratio=None, phema=True)
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
REPORT_TO = ("tensorboard", "wandb", "all", "none")

# The --help sections.
DATA = "data and model"
OPTIM = "optimisation (EDM's loop)"
SPEED = "speed and memory"
OUTPUT = "checkpoints, logging, export"
# On resume: MODEL settings must match the checkpoint's; a changed RUN setting is allowed with a warning;
# DISPLAY settings change only how a run is shown, never the model it produces.
MODEL, RUN, DISPLAY = "model", "run", "display"


class ConfigError(UserInputError):
    """A bad argument or input, found before training starts; the message names the flag or file."""


def architecture_names() -> tuple[str, ...]:
    from pipelines.networks import ARCHITECTURES  # imports the networks (diffusers): only when asked

    return tuple(ARCHITECTURES)


def _option(default: Any = dataclasses.MISSING, *, help: str, group: str, factory: Callable | None = None,
            choices: Sequence[str] | Callable[[], Sequence[str]] | None = None, resume: str | None = None,
            default_text: str | None = None, above: float | None = None, at_least: float | None = None,
            below: float | None = None) -> Any:
    """A TrainConfig field. ``default_text``: how ``--help`` states a default that is not a plain value;
    ``above`` / ``at_least`` / ``below``: the bounds :func:`validate_config` checks (each value of a tuple)."""
    metadata = {"help": help, "group": group, "choices": choices, "resume": resume, "default_text": default_text,
                "bounds": (above, at_least, below)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Everything a run depends on; each field is the ``train_unconditional.py`` flag of the same name."""

    dataset: str = _option(help="frame dataset folder (save_to_disk output) or Hub dataset id", group=DATA)
    output_dir: str = _option(help="checkpoints, logs, samples and the final pipeline", group=DATA)
    arch: str = _option("adm", help="network", group=DATA, choices=architecture_names, resume=MODEL)
    precond: str = _option("edm", help="preconditioning and loss", group=DATA, choices=PRECONDITIONINGS,
                           resume=MODEL)
    recipe: str = _option(
        "edm", help="training recipe: 'edm2' (with an edm2-* arch) fills every setting not given explicitly "
        "with NVlabs edm2's img64 preset (lr, dropout, duration, batch 2048, lr decay, Adam beta2 0.99, "
        "P_mean/P_std, post-hoc EMA, no EMA ramp-up)", group=DATA, choices=RECIPES, resume=MODEL)
    split: str = _option("train", help="dataset split to train on", group=DATA)
    resolution: int | None = _option(None, help="checked against the dataset", group=DATA, resume=MODEL,
                                     default_text="the dataset's")
    channels: int | None = _option(None, help="1 (gray) or 3 (gray repeated)", group=DATA, resume=MODEL,
                                   default_text="1")
    dropout: float = _option(0.05, help="dropout probability of the network", group=DATA, resume=RUN, at_least=0,
                             below=1)
    network_overrides: dict[str, Any] = _option(
        help="JSON object of network config fields, e.g. a smaller model_channels", group=DATA, factory=dict,
        resume=MODEL)
    condition: str | None = _option(
        None, help="train a conditional model on these comma-separated dataset columns, e.g. 'ef,phase' (EF a "
        "scaled scalar, categorical columns one-hot; 'phase' is ED / ES / other from is_ed_frame / is_es_frame; "
        "docs/conditioning.md)", group=DATA, resume=MODEL, default_text="unconditional")
    label_dropout: float = _option(
        0.1, help="with --condition: probability that an image trains the null label (unconditional sampling and "
        "classifier-free guidance need it)", group=DATA, resume=MODEL, at_least=0, below=1)
    duration_kimg: float | None = _option(
        None, help="training length in thousands of images", group=OPTIM,
        default_text="Table 1: " + ", ".join(f"{a} {k:g}" for a, k in PAPER_DURATION_KIMG.items())
        + "; edm2-*: EDM2's img64 preset", above=0)
    batch_size: int = _option(512, help="global batch over all processes", group=OPTIM, resume=RUN, above=0)
    batch_per_gpu: int | None = _option(
        None, help="images per process per forward pass; gradient accumulation makes up the rest", group=OPTIM,
        default_text="batch_size / processes, no accumulation", above=0)
    lr: float = _option(1e-3, help="Adam learning rate after the warm-up", group=OPTIM, resume=RUN, above=0)
    lr_rampup_kimg: float = _option(10000.0, help="linear learning-rate warm-up, in kimg", group=OPTIM,
                                    resume=RUN, at_least=0)
    lr_ref_batches: float = _option(
        0.0, help="EDM2's inverse-square-root decay: lr / sqrt(max(steps / N, 1)) (0: no decay)", group=OPTIM,
        resume=RUN, at_least=0)
    p_mean: float = _option(-1.2, help="EDM loss: mean of ln(sigma)", group=OPTIM, resume=RUN)
    p_std: float = _option(1.2, help="EDM loss: std of ln(sigma)", group=OPTIM, resume=RUN, above=0)
    adam_beta1: float = _option(0.9, help="Adam beta1", group=OPTIM)
    adam_beta2: float = _option(0.999, help="Adam beta2", group=OPTIM)
    adam_epsilon: float = _option(1e-8, help="Adam epsilon", group=OPTIM)
    ema_halflife_kimg: tuple[float, ...] = _option(
        (500.0,), help="one or more EMA half-lives; the first is exported as <output_dir>/pipeline", group=OPTIM,
        resume=MODEL, above=0)
    ema_rampup_ratio: float | None = _option(
        0.05, help="cap the half-life at this fraction of images seen ('none' to disable)", group=OPTIM, above=0)
    phema: bool = _option(False, help="track post-hoc EMA profiles and store snapshots under <output_dir>/phema",
                          group=OPTIM, resume=MODEL)
    phema_std: tuple[float, ...] = _option((0.050, 0.100), help="relative stds of the tracked power-function EMAs",
                                           group=OPTIM, resume=MODEL, above=0, below=0.2886)
    phema_snapshot_kimg: float = _option(1000.0, help="post-hoc EMA snapshot every N kimg (and at the end)",
                                         group=OPTIM, resume=RUN, above=0)
    phema_bf16: bool = _option(False, help="store the post-hoc EMA snapshots in bfloat16 (half the disk)",
                               group=OPTIM, resume=RUN)
    seed: int = _option(0, help="seed of the initial weights, the data order and the noise", group=OPTIM,
                        resume=RUN)
    mixed_precision: str = _option(
        "auto", help="autocast precision (auto: the accelerate config's, else bf16 on a CPU with native bf16, "
        "else fp32)", group=SPEED, choices=MIXED_PRECISION, resume=RUN)
    compile: bool = _option(False, help="torch.compile the network (inductor)", group=SPEED)
    # Channels-last: faster for every paper-size network on CPU (issue 10) and the tensor cores' layout.
    channels_last: bool = _option(True, help="channels-last (NHWC) network and inputs", group=SPEED)
    allow_tf32: bool = _option(False, help="TF32 matmuls/convolutions on Ampere+ GPUs", group=SPEED)
    gradient_checkpointing: bool = _option(False, help="recompute activations in the backward pass (less memory)",
                                           group=SPEED)
    cpu: bool = _option(False, help="train on the CPU even if a GPU is present", group=SPEED)
    dataloader_num_workers: int = _option(2, help="data loader worker processes", group=SPEED, at_least=0)
    checkpointing_kimg: float = _option(1000.0, help="full training state every N kimg (and at the end)",
                                        group=OUTPUT, above=0)
    checkpoints_total_limit: int | None = _option(None, help="keep only the newest N checkpoints", group=OUTPUT,
                                                  default_text="keep all", at_least=1)
    resume_from_checkpoint: str | None = _option(None, help="'latest' or a checkpoint folder", group=OUTPUT,
                                                 default_text="start a new run")
    accept_inexact_resume: bool = _option(
        False, help="resume even when the checkpoint cannot restore the run exactly (a missing or unreadable RNG "
        "state, another dataset)", group=OUTPUT)
    overwrite: bool = _option(False, help="start a new run in an --output_dir that holds another run, deleting it",
                              group=OUTPUT)
    snapshot_kimg: float = _option(2500.0, help="sample grid every N kimg", group=OUTPUT, above=0)
    save_pipeline_at_snapshot: bool = _option(False, help="also save a pipeline under snapshots/ at each snapshot",
                                              group=OUTPUT)
    num_sample_images: int = _option(16, help="images in each sample grid (0: no grids)", group=OUTPUT,
                                     at_least=0)
    sample_steps: int = _option(18, help="Heun steps for the sample grid", group=OUTPUT, above=0)
    logging_steps: int = _option(10, help="log the metrics every N steps", group=OUTPUT, resume=DISPLAY, above=0)
    report_to: str = _option("tensorboard", help="tracker", group=OUTPUT, choices=REPORT_TO, resume=DISPLAY)
    tracker_project_name: str = _option("echodiff", help="tracker project (tensorboard: logs/<name>)",
                                        group=OUTPUT, resume=DISPLAY)
    push_to_hub: bool = _option(False, help="upload <output_dir>/pipeline to the Hub at the end", group=OUTPUT)
    hub_model_id: str | None = _option(None, help="Hub repo for --push_to_hub, e.g. your-name/echodiff-adm-edm",
                                       group=OUTPUT, default_text="none")
    hub_private: bool = _option(True, help="make the Hub repo private", group=OUTPUT)
    progress_bar: bool = _option(True, help="show a progress bar", group=OUTPUT, resume=DISPLAY)

    @property
    def duration_nimg(self) -> int:
        if self.duration_kimg is not None:
            return int(round(self.duration_kimg * 1000))
        return EDM2_IMG64[self.arch][2] if self.arch in EDM2_IMG64 else int(round(PAPER_DURATION_KIMG[self.arch] * 1000))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["ema_halflife_kimg"] = [float(h) for h in self.ema_halflife_kimg]
        out["phema_std"] = [float(s) for s in self.phema_std]
        out["duration_kimg"] = self.duration_nimg / 1000
        return out


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
REQUIRED = tuple(name for name, f in FIELDS.items()
                 if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)


def fields_with_resume_role(role: str) -> tuple[str, ...]:
    """Names of the fields that play ``role`` (MODEL, RUN or DISPLAY) when a run is resumed."""
    return tuple(name for name, f in FIELDS.items() if f.metadata["resume"] == role)


def recipe_settings(recipe: str, arch: str) -> dict[str, Any]:
    """The settings ``recipe`` gives ``arch`` (the fields it fills when they are not given)."""
    if recipe != "edm2":
        return {}
    if arch not in EDM2_IMG64:
        raise ConfigError(f"--recipe edm2: expected --arch one of {sorted(EDM2_IMG64)} (EDM2's img64 UNets), "
                          f"got {arch!r}")
    lr, dropout, duration_nimg = EDM2_IMG64[arch]
    return dict(EDM2_RECIPE, lr=lr, dropout=dropout, duration_kimg=duration_nimg / 1000)


def effective_defaults(recipe: str, arch: str) -> dict[str, Any]:
    """Each field's value when not given: its declared default, or the recipe's."""
    defaults = {name: _default_of(f) for name, f in FIELDS.items() if name not in REQUIRED}
    return dict(defaults, **recipe_settings(recipe, arch))


def default_value(name: str) -> Any:
    """The declared default of field ``name`` (None for a required field or a name that is not a field)."""
    field = FIELDS.get(name)
    return None if field is None or name in REQUIRED else _default_of(field)


def choices_of(name: str) -> tuple[str, ...] | None:
    choices = FIELDS[name].metadata["choices"]
    return tuple(choices() if callable(choices) else choices) if choices is not None else None


# --------------------------------------------------------------------------------------------------
# field types -> argparse and back


_HINTS = typing.get_type_hints(TrainConfig)


def _value_type(name: str) -> tuple[type, bool]:
    """(base type, optional) of a field: ``int | None`` -> (int, True)."""
    hint = _HINTS[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        (hint,) = [a for a in args if a is not type(None)]
    return typing.get_origin(hint) or hint, optional


def _parse_function(base: type, optional: bool) -> Callable[[str], Any]:
    parse = {dict: json_object_arg, tuple: finite_float_arg, float: finite_float_arg}.get(base, base)
    if not optional:
        return parse

    def parse_optional(text: str):
        return None if text.lower() in ("none", "off") else parse(text)

    parse_optional.__name__ = f"optional {parse.__name__}"  # argparse names it in "invalid ... value"
    return parse_optional


def _default_of(f: dataclasses.Field) -> Any:
    return f.default if f.default_factory is dataclasses.MISSING else f.default_factory()  # a fresh {} each time


def _help_text(f: dataclasses.Field) -> str:
    text = f.metadata["help"]
    choices = choices_of(f.name)
    if choices:
        text += f": one of {list(choices)}"
    if f.name in REQUIRED:
        return text + " (required)"
    default = _default_of(f)
    shown = f.metadata["default_text"] or (" ".join(f"{v:g}" for v in default) if isinstance(default, tuple)
                                           else json.dumps(default) if isinstance(default, dict) else default)
    return f"{text} (default: {shown})".replace("%", "%%")


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The ``train_unconditional.py`` parser, one flag per ``TrainConfig`` field."""
    parser = make_parser(description)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, f in FIELDS.items():
        if f.metadata["group"] not in groups:
            groups[f.metadata["group"]] = parser.add_argument_group(f.metadata["group"])
        group = groups[f.metadata["group"]]
        base, optional = _value_type(name)
        flag, help_text = f"--{name}", _help_text(f)
        if base is bool and (f.default or name in EDM2_RECIPE):  # a recipe may turn it on: --no_ turns it off
            group.add_argument(flag, f"--no_{name}", dest=name, action=_SnakeBooleanAction, default=f.default,
                               help=help_text)
        elif base is bool:
            group.add_argument(flag, action="store_true", help=help_text)
        else:
            group.add_argument(flag, type=_parse_function(base, optional), nargs="+" if base is tuple else None,
                               required=name in REQUIRED, help=help_text,
                               **({} if name in REQUIRED else {"default": _default_of(f)}))
    return parser


class _SnakeBooleanAction(argparse.Action):
    """``--name`` / ``--no_name`` (argparse's BooleanOptionalAction spells the second ``--no-name``)."""

    def __init__(self, option_strings, dest, default=None, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not option_string.startswith("--no_"))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def config_from_cli_args(argv: Sequence[str] | None = None, description: str | None = None) -> TrainConfig:
    """Parse ``train_unconditional.py`` flags into a TrainConfig (argparse exits on a malformed flag)."""
    parser = build_parser(description)
    # Only the flags given reach config_from_dict, so that a --recipe fills the others.
    for action in parser._actions:  # argparse's public set_defaults would store SUPPRESS as a value
        if action.dest in FIELDS and action.dest not in REQUIRED:
            action.default = argparse.SUPPRESS
    return config_from_dict(vars(parser.parse_args(argv)), "command line")


def config_to_cli_args(cfg: TrainConfig) -> list[str]:
    """``train_unconditional.py`` flags that reproduce ``cfg`` (settings left at their default are omitted)."""
    args: list[str] = []
    defaults = effective_defaults(cfg.recipe, cfg.arch)
    for name in FIELDS:
        value = getattr(cfg, name)
        if name not in REQUIRED and value == defaults[name]:
            continue
        base, _ = _value_type(name)
        if base is bool:
            args.append(f"--{name}" if value else f"--no_{name}")
        elif value is None:
            args += [f"--{name}", "none"]
        elif base is tuple:
            args += [f"--{name}", *[repr(float(v)) for v in value]]
        elif base is dict:
            args += [f"--{name}", json.dumps(value)]
        else:
            args += [f"--{name}", repr(value) if base is float else str(value)]
    return args


def config_from_dict(values: dict[str, Any], where: str = "config") -> TrainConfig:
    """A TrainConfig from a mapping of field names (lists accepted for tuples); unknown names are an error."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of TrainConfig fields, got {type(values).__name__}")
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown training setting(s) {unknown}; expected fields of "
                          f"pipelines.training.TrainConfig such as batch_size, duration_kimg, network_overrides")
    values = dict(values)
    for name in values:
        if _value_type(name)[0] is tuple and values[name] is not None:
            given = values[name]
            values[name] = tuple(given) if isinstance(given, (list, tuple)) else (given,)
    missing = [name for name in REQUIRED if name not in values]
    if missing:
        raise ConfigError(f"{where}: missing required setting(s) {missing}")
    recipe = values.get("recipe", _default_of(FIELDS["recipe"]))
    for name, value in recipe_settings(recipe, values.get("arch", _default_of(FIELDS["arch"]))).items():
        values.setdefault(name, value)
    return TrainConfig(**values)


# --------------------------------------------------------------------------------------------------
# validation


def validate_config(cfg: TrainConfig) -> None:
    """Checks that need neither the dataset nor the devices; raises ConfigError naming the argument."""
    for name in FIELDS:
        choices = choices_of(name)
        if choices and getattr(cfg, name) not in choices:
            raise ConfigError(f"--{name}: expected one of {list(choices)}, got {getattr(cfg, name)!r}")
    for name, f in FIELDS.items():
        _check_bounds(name, getattr(cfg, name), *f.metadata["bounds"])
    if not cfg.ema_halflife_kimg:
        raise ConfigError("--ema_halflife_kimg: expected one or more positive values, got none")
    if cfg.phema and not cfg.phema_std:
        raise ConfigError("--phema_std: expected one or more relative stds, got none")
    if cfg.recipe == "edm2":
        recipe_settings(cfg.recipe, cfg.arch)  # checks the arch
        if cfg.precond != "edm":
            raise ConfigError(f"--recipe edm2: EDM2 keeps EDM's preconditioning; expected --precond edm, got "
                              f"{cfg.precond!r}")
    if not cfg.duration_nimg > 0:
        raise ConfigError(f"--duration_kimg: expected at least one image, got {cfg.duration_kimg}")
    if cfg.report_to in ("wandb", "all"):
        from accelerate.utils import is_wandb_available

        if not is_wandb_available():
            raise ConfigError(f"--report_to {cfg.report_to}: wandb is not installed (pip install wandb)")
    if cfg.push_to_hub and not cfg.hub_model_id:
        raise ConfigError("--push_to_hub needs --hub_model_id (e.g. your-name/echodiff-adm-edm)")
    _validate_network_overrides(cfg)


def _check_bounds(name: str, value: Any, above: float | None, at_least: float | None, below: float | None) -> None:
    for item in value if isinstance(value, tuple) else (value,):
        if item is None:
            continue  # an optional setting left unset
        if isinstance(item, float) and not math.isfinite(item):  # inf would pass "> 0" and overflow later
            raise ConfigError(f"--{name}: expected a finite number, got {item}")
        if (above is not None and not item > above) or (at_least is not None and not item >= at_least) or (
                below is not None and not item < below):
            wanted = " and ".join(text for bound, text in ((above, f"> {above}"), (at_least, f">= {at_least}"),
                                                           (below, f"< {below}")) if bound is not None)
            raise ConfigError(f"--{name}: expected a value {wanted}, got {item}")


def _validate_network_overrides(cfg: TrainConfig) -> None:
    for name, flag in (("label_dim", "--condition"), ("label_dropout", "--label_dropout")):
        if name in cfg.network_overrides:  # the label width follows the conditions; dropout is drawn per image
            raise ConfigError(f"--network_overrides: {name} is set by {flag}")
    if "out_channels" in cfg.network_overrides:  # D = c_skip x + c_out F needs F shaped like x
        raise ConfigError("--network_overrides: out_channels follows --channels (a denoiser outputs an image)")
    # Cheap structural check of the overrides now, so a typo fails before the dataset is read.
    from pipelines.networks import network_config

    try:
        network_config(cfg.arch, dropout=cfg.dropout, **cfg.network_overrides)
    except (TypeError, ValueError) as err:  # TypeError: a build_network argument given as an override
        raise ConfigError(f"--network_overrides: {err} (resolution, channels and dropout have their own flags)") \
            from err
