"""The paper's Table 1 sweep: train each listed run, score it by FID, write a Markdown table.

A sweep config (YAML or JSON) names the dataset, the training settings shared by all runs, the
evaluation protocol and the runs (arch, precond, budget in kimg, any other ``TrainConfig`` field)::

    dataset: data/echonet_frames_64
    output_dir: runs/table1
    launcher: null            # null: train in this process; or e.g.
                              # "accelerate launch --config_file accelerate_configs/8gpu_a40.yaml"
    train: {batch_size: 512, dropout: 0.05, mixed_precision: bf16}
    evaluation: {num_generated: 50000, steps: 30, num_real: 50000, split: all}
    runs:
      - {name: adm-edm, arch: adm, precond: edm, duration_kimg: 30106, paper_fid: 3.75}

Each run lives in ``<output_dir>/<name>/``: the training run (``train/``, resumed from its latest
checkpoint when interrupted), the generated shards (resumed per shard) and ``result.json``, written
last: a run with a ``result.json`` is skipped on the next invocation. The table
(``table1.md``, plus ``table1.json``) is rewritten after every run. The same config runs at tiny
scale on a CPU (``configs/sweep_demo.yaml``) and at the paper's scale on GPUs
(``configs/sweep_table1.yaml``): only numbers differ.

With ``launcher`` set, each training is a subprocess ``<launcher> train_unconditional.py <flags>``
(multi-GPU); generation and FID then run in this process on its default device. ``launcher`` is a command
line that EchoDiff runs as given (split with ``shlex``, no shell): a sweep config is a program, so run only
configs you wrote or have read (docs/security.md). The rest of the file is data (``yaml.safe_load``). Without it,
training runs in this process via ``pipelines.training.train`` (launch the sweep itself with
``accelerate launch`` to train and generate on several processes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

from pipelines.cli import make_parser
from pipelines.errors import run_cli
from pipelines.training.config import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    config_to_cli_args,
    validate_config,
)
from pipelines.utils import REPO_ROOT, atomic_write_json, atomic_write_text

# Display names in the table (the paper's spelling).
MODEL_NAMES = {"adm": "ADM", "ddpmpp": "DDPM++", "ncsnpp": "NCSN++"}
SAMPLER_NAMES = {"edm": "EDM", "vp": "VP", "ve": "VE"}
RESULT_FILE = "result.json"
# Set by the sweep itself, per run: not allowed in the config's train: section or a run.
SWEEP_OWNED = {"dataset", "output_dir", "resume_from_checkpoint"}
RUN_KEYS = {"name", "paper_fid"}
EVALUATION_DEFAULTS = {"num_generated": 50_000, "first_seed": 0, "steps": 30, "num_real": 50_000,
                       "subsample_seed": 0, "split": "train", "batch_size": 64, "gen_batch_size": 64,
                       "kid": True, "sampler_kwargs": {}}


@dataclasses.dataclass
class SweepRun:
    name: str
    train: dict[str, Any]  # TrainConfig fields (arch, precond, duration_kimg, ...)
    paper_fid: float | None = None


@dataclasses.dataclass
class SweepConfig:
    dataset: str
    output_dir: str
    runs: list[SweepRun]
    train: dict[str, Any] = dataclasses.field(default_factory=dict)
    evaluation: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(EVALUATION_DEFAULTS))
    launcher: str | None = None
    source: str | None = None  # the config file it came from
    raw: dict[str, Any] = dataclasses.field(default_factory=dict)

    def train_config(self, run: SweepRun) -> TrainConfig:
        values = {**self.train, **run.train, "dataset": self.dataset,
                  "output_dir": str(Path(self.output_dir) / run.name / "train"), "resume_from_checkpoint": "latest"}
        return config_from_dict(values, f"run {run.name!r}")


def _check_train_fields(values: Any, where: str) -> dict[str, Any]:
    """``values`` as a dict if they are TrainConfig fields the sweep leaves to its config."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of TrainConfig fields, got {type(values).__name__}")
    owned = sorted(set(values) & SWEEP_OWNED)
    if owned:
        raise ConfigError(f"{where}: {owned} are set by the sweep (dataset / output_dir at the top level)")
    config_from_dict({**values, "dataset": "-", "output_dir": "-"}, where)  # unknown field names fail here
    return dict(values)


def parse_sweep_config(data: dict[str, Any], source: str = "<config>") -> SweepConfig:
    """Validates a loaded config mapping; errors name the file and the offending key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    known = {"dataset", "output_dir", "runs", "train", "evaluation", "launcher", "description"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {unknown}; expected some of {sorted(known)}")
    for key in ("dataset", "output_dir", "runs"):
        if key not in data:
            raise ConfigError(f"{source}: missing required key '{key}'")
    train = _check_train_fields(data.get("train") or {}, f"{source}: train")
    evaluation = dict(EVALUATION_DEFAULTS)
    given = data.get("evaluation") or {}
    if not isinstance(given, dict) or set(given) - set(EVALUATION_DEFAULTS):
        raise ConfigError(f"{source}: evaluation: expected a mapping with keys among {sorted(EVALUATION_DEFAULTS)}, "
                          f"got {given!r}")
    evaluation.update(given)
    if not (isinstance(evaluation["num_generated"], int) and evaluation["num_generated"] >= 2):
        raise ConfigError(f"{source}: evaluation.num_generated: expected an integer >= 2, "
                          f"got {evaluation['num_generated']!r}")
    if not isinstance(data["runs"], list) or not data["runs"]:
        raise ConfigError(f"{source}: runs: expected a non-empty list of runs")
    runs, names = [], set()
    for index, entry in enumerate(data["runs"]):
        where = f"{source}: runs[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping, got {entry!r}")
        fields = _check_train_fields({k: v for k, v in entry.items() if k not in RUN_KEYS}, where)
        merged = config_from_dict({**train, **fields, "dataset": "-", "output_dir": "-"}, where)
        name = str(entry.get("name") or f"{merged.arch}-{merged.precond}")
        if name in names or "/" in name or name.startswith("."):
            raise ConfigError(f"{where}: run name {name!r} is repeated or not a plain folder name")
        names.add(name)
        runs.append(SweepRun(name=name, train=fields, paper_fid=entry.get("paper_fid")))
    launcher = data.get("launcher")
    if launcher is not None and not isinstance(launcher, str):
        raise ConfigError(f"{source}: launcher: expected a command string or null, got {launcher!r}")
    config = SweepConfig(dataset=str(data["dataset"]), output_dir=str(data["output_dir"]), runs=runs, train=train,
                         evaluation=evaluation, launcher=launcher, source=source, raw=data)
    for run in runs:  # every run's settings are checked before the first one trains
        try:
            validate_config(config.train_config(run))
        except (ConfigError, TypeError) as err:
            raise ConfigError(f"{source}: run {run.name!r}: {err}") from err
    return config


def load_sweep_config(path: str | os.PathLike, **overrides: Any) -> SweepConfig:
    """Reads a YAML (``.yaml``/``.yml``) or JSON sweep config; ``overrides`` replace top-level keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file (expected a YAML or JSON sweep config)")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # yaml.YAMLError / json.JSONDecodeError: say which file
        raise ConfigError(f"--config {path}: cannot parse ({type(err).__name__}: {err})") from err
    if isinstance(data, dict):
        data.update({k: v for k, v in overrides.items() if v is not None})
    return parse_sweep_config(data, source=str(path))


# --------------------------------------------------------------------------------------------------
# training


def train_run(config: SweepConfig, run: SweepRun, progress: bool = True) -> None:
    """Trains (or resumes) one run to its budget; ends with ``<run>/train/pipeline``."""
    tcfg = config.train_config(run)
    tcfg.progress_bar = tcfg.progress_bar and progress
    if config.launcher:
        command = [*shlex.split(config.launcher), str(REPO_ROOT / "train_unconditional.py"), *config_to_cli_args(tcfg)]
        print("launching:", shlex.join(command), flush=True)
        completed = subprocess.run(command, cwd=str(REPO_ROOT))
        if completed.returncode != 0:
            raise RuntimeError(f"run {run.name!r}: training exited with status {completed.returncode} "
                               f"(command: {shlex.join(command)}); rerun the sweep to resume from its checkpoint")
        return
    from pipelines.training import train
    from pipelines.utils import reset_accelerate_state

    reset_accelerate_state()  # each run may pick its own precision / device settings
    train(tcfg)
    reset_accelerate_state()


# --------------------------------------------------------------------------------------------------
# evaluation and the table


def evaluate_run(config: SweepConfig, run: SweepRun, cache_dir: Path, progress: bool = True) -> dict | None:
    """FID (+ KID) of the run's exported pipeline with the sweep's protocol; None on non-main processes."""
    from accelerate import Accelerator

    from pipelines.data.frame_reader import load_frames
    from pipelines.evaluation import protocol as ev
    from pipelines.evaluation.fid import InceptionDetector
    from pipelines.hub import load_pipeline

    ev_cfg = config.evaluation
    accelerator = Accelerator()
    pipeline_dir = Path(config.output_dir) / run.name / "train" / "pipeline"
    pipe = load_pipeline(pipeline_dir, device=str(accelerator.device))
    frames = load_frames(config.dataset, ev_cfg["split"])
    from pipelines.evaluation.conditioning import with_real_conditions

    # A run trained with a `condition:` samples conditions drawn from the real frames' labels.
    pipe, drawn = with_real_conditions(pipe, frames, int(ev_cfg["subsample_seed"]))
    run_info = {"model": str(pipeline_dir), **({"conditions": drawn} if drawn else {})}
    first = int(ev_cfg["first_seed"])
    seeds = list(range(first, first + int(ev_cfg["num_generated"])))
    detector = InceptionDetector(device=str(accelerator.device)) if accelerator.is_main_process else None
    result = ev.fid_of_samples(
        pipe, Path(config.output_dir) / run.name / f"samples-steps{ev_cfg['steps']}", seeds, frames,
        num_inference_steps=int(ev_cfg["steps"]), num_real=ev_cfg["num_real"],
        subsample_seed=int(ev_cfg["subsample_seed"]), cache_dir=cache_dir, detector=detector,
        batch_size=int(ev_cfg["batch_size"]), gen_batch_size=int(ev_cfg["gen_batch_size"]),
        accelerator=accelerator, kid=bool(ev_cfg["kid"]), run_info=run_info,
        progress=progress, **ev_cfg["sampler_kwargs"])
    if result is None:
        return None
    state = _training_summary(pipeline_dir)
    result.pop("reference", None)
    return {"name": run.name, **state, "paper_fid": run.paper_fid,
            "evaluation": result}


def _training_summary(pipeline_dir: Path) -> dict:
    """What the exported run says about itself: arch, precond, batch, images seen, parameters."""
    from pipelines.hub import count_parameters
    from pipelines.training.checkpoints import training_checkpoints

    store = training_checkpoints(pipeline_dir.parent)
    checkpoint = store.latest()
    if checkpoint is None:
        raise FileNotFoundError(f"{store.root}: no finished checkpoint to read the run's state from")
    state = store.read_state(checkpoint)
    cfg = state["config"]
    return {"arch": cfg["arch"], "precond": cfg["precond"], "batch_size": cfg["batch_size"],
            "images_seen": state["images_seen"], "duration_kimg": cfg["duration_kimg"],
            "num_parameters": count_parameters(pipeline_dir / "unet"), "train_config": cfg}


def _format_kimg(images_seen: int) -> str:
    kimg = images_seen / 1000
    return f"{kimg:,.0f}" if kimg >= 100 else f"{kimg:,.3g}"


def _format_mparams(num: int | None) -> str:
    if num is None:
        return "?"
    m = num / 1e6
    return f"{m:.1f}" if m >= 10 else f"{m:.3g}"


TABLE_COLUMNS = ("Model", "Sampler", "Batch", "K img", "M Param", "FID", "KID", "Paper FID", "Run")


def table_rows(results: list[dict]) -> list[dict[str, str]]:
    rows = []
    for r in results:
        ev = r["evaluation"]
        rows.append({
            "Model": MODEL_NAMES[r["arch"]], "Sampler": SAMPLER_NAMES[r["precond"]], "Batch": str(r["batch_size"]),
            "K img": _format_kimg(r["images_seen"]), "M Param": _format_mparams(r["num_parameters"]),
            "FID": f"{ev['fid']:.2f}" if math.isfinite(ev["fid"]) else "nan",
            "KID": f"{ev['kid']:.4f}" if "kid" in ev else "-",
            "Paper FID": "-" if r.get("paper_fid") is None else f"{r['paper_fid']:g}", "Run": r["name"],
        })
    return rows


def render_table(config: SweepConfig, results: list[dict], pending: list[str]) -> str:
    ev_cfg = config.evaluation
    rows = table_rows(results)
    evaluations = [r["evaluation"] for r in results]
    recorded = sorted({f"{e.get('sampler')} = {e['nfe']} NFE" for e in evaluations if e.get("nfe") is not None})
    sampling = ", ".join(recorded) or "NFE as each run's sampler counts it"  # exact, from the pipelines
    lines = ["# Table 1 sweep", "",
             f"FID of {ev_cfg['num_generated']:,} generated images (seeds {ev_cfg['first_seed']}-"
             f"{ev_cfg['first_seed'] + ev_cfg['num_generated'] - 1}, {ev_cfg['steps']} steps: {sampling}) against a fixed subsample of {ev_cfg['num_real'] or 'all'} real frames "
             f"(split {ev_cfg['split']}, seed {ev_cfg['subsample_seed']}); Sampler is the preconditioning the model "
             "was trained and sampled with.", ""]
    if ev_cfg["num_generated"] < 50_000:
        lines += ["FID on fewer than 50,000 images is biased upwards: compare rows only with each other.", ""]
    lines.append("| " + " | ".join(TABLE_COLUMNS) + " |")
    lines.append("|" + "---|" * len(TABLE_COLUMNS))
    lines += ["| " + " | ".join(row[c] for c in TABLE_COLUMNS) + " |" for row in rows]
    if pending:
        lines += ["", f"Not finished yet: {', '.join(pending)}."]
    lines += ["", "## Sweep configuration", "", f"Source: `{config.source}`", "", "```json",
              json.dumps(config.raw, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def run_sweep(config: SweepConfig | str | os.PathLike, only: list[str] | None = None, progress: bool = True,
              cache_dir: str | os.PathLike | None = None) -> dict:
    """Trains and scores every run not finished yet; returns {"results", "table", "table_path"}.

    ``only``: run names to work on (the table still lists every finished run).
    """
    config = config if isinstance(config, SweepConfig) else load_sweep_config(config)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir is not None else out / "cache"
    names = [r.name for r in config.runs]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ConfigError(f"--only: unknown run name(s) {unknown}; the config lists {names}")
    from accelerate import PartialState

    is_main = PartialState().is_main_process
    for run in config.runs:
        result_path = out / run.name / RESULT_FILE
        if result_path.is_file():
            print(f"[sweep] {run.name}: finished earlier, skipped ({result_path})", flush=True)
            continue
        if only and run.name not in only:
            continue
        print(f"[sweep] {run.name}: training", flush=True)
        train_run(config, run, progress)
        print(f"[sweep] {run.name}: generating and scoring", flush=True)
        result = evaluate_run(config, run, cache_dir, progress)
        if is_main and result is not None:
            atomic_write_json(result_path, result, default=str)
            write_outputs(config)
    table, path = write_outputs(config) if is_main else (None, None)
    if table:
        print(table)
    return {"results": collect_results(config), "table": table, "table_path": path}


def collect_results(config: SweepConfig) -> list[dict]:
    results = []
    for run in config.runs:
        path = Path(config.output_dir) / run.name / RESULT_FILE
        if path.is_file():
            results.append(json.loads(path.read_text()))
    return results


def write_outputs(config: SweepConfig) -> tuple[str, Path]:
    results = collect_results(config)
    done = {r["name"] for r in results}
    pending = [r.name for r in config.runs if r.name not in done]
    table = render_table(config, results, pending)
    out = Path(config.output_dir)
    atomic_write_text(out / "table1.md", table)
    atomic_write_json(out / "table1.json", {"rows": table_rows(results), "results": results, "pending": pending,
                                            "config": config.raw}, default=str)
    return table, out / "table1.md"


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or make_parser("Table 1 sweep: train and score each run of a config")
    parser.add_argument("--config", required=True, help="sweep config (YAML or JSON), e.g. configs/sweep_demo.yaml")
    parser.add_argument("--output_dir", default=None, help="override the config's output_dir")
    parser.add_argument("--dataset", default=None, help="override the config's dataset")
    parser.add_argument("--only", default=None, help="comma list of run names to work on (default: all)")
    parser.add_argument("--cache_dir", default=None, help="Inception feature cache (default <output_dir>/cache)")
    parser.add_argument("--no_progress_bar", action="store_true", help="hide progress bars")
    return parser


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> dict:
    args = args if args is not None else build_parser().parse_args(argv)
    config = load_sweep_config(args.config, output_dir=args.output_dir, dataset=args.dataset)
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    return run_sweep(config, only=only, progress=not args.no_progress_bar, cache_dir=args.cache_dir)


if __name__ == "__main__":
    run_cli(main)
