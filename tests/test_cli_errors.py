"""Bad input to every script ends in one ``error:`` line naming the flag or file, exit code 2, no traceback;
``--help`` keeps the docstrings' lines and shows each default once."""

import argparse
import importlib
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.errors import run_cli

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["train_unconditional", "train_discriminator", "evaluate", "evaluate_distribution_shift",
           "build_echonet_frames", "make_synthetic_echonet", "convert_edm_checkpoint", "audit_memorization",
           "demo", "app"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from pipelines.components.pipeline_echodiff import EchoDiffPipeline
    from pipelines.components.scheduling_edm_heun import EDMHeunScheduler
    from pipelines.data.frame_builder import build_frame_dataset
    from pipelines.data.synthetic_echonet import write_synthetic_echonet
    from pipelines.networks import build_network, tiny_config

    root = tmp_path_factory.mktemp("cli-errors")
    echonet = write_synthetic_echonet(root / "echonet", num_videos=4, seed=0, num_frames=(8, 9), num_workers=1)
    build_frame_dataset(echonet, root / "frames", resolution=16, frame_stride=4, num_workers=1, progress=False,
                        verbose=False)
    torch.manual_seed(0)
    pipe = EchoDiffPipeline(unet=build_network("ddpmpp", **tiny_config("ddpmpp")), scheduler=EDMHeunScheduler())
    pipe.save_pretrained(root / "model")

    import shutil

    truncated = root / "truncated"
    shutil.copytree(root / "model", truncated)
    weights = truncated / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    malformed = root / "malformed"
    shutil.copytree(root / "model", malformed)
    (malformed / "model_index.json").write_text('{"_class_name": ["pipeline_echodiff", "EchoDiffPipeline"],')
    (root / "not-a-pipeline").mkdir()
    (root / "not-a-pipeline" / "notes.txt").write_text("hello")
    (root / "a-file.txt").write_text("hello")
    torch.save([torch.zeros(1)], root / "list.pt")
    return {"root": root, "echonet": str(echonet), "frames": str(root / "frames"), "model": str(root / "model"),
            "cache": str(root / "cache")}


def _fid(ws, *extra):
    return ["fid", *extra, "--dataset", ws["frames"], "--cache_dir", ws["cache"], "--no_progress_bar",
            "--output_dir", str(ws["root"] / "eval")]


def _disc(ws, *extra):
    return ["--model", ws["model"], "--dataset", ws["frames"], "--output_dir", str(ws["root"] / "dg"),
            "--no_progress_bar", *extra]


# (script, argv built from the workspace, what the one error line must name)
CASES = {
    "train: --duration_kimg inf": ("train_unconditional", lambda w: [
        "--dataset", w["frames"], "--output_dir", str(w["root"] / "t"), "--duration_kimg", "inf"], "--duration_kimg"),
    "train: --lr nan": ("train_unconditional", lambda w: [
        "--dataset", w["frames"], "--output_dir", str(w["root"] / "t"), "--lr", "nan"], "--lr"),
    "train: nonexistent --dataset": ("train_unconditional", lambda w: [
        "--dataset", str(w["root"] / "no-such-frames"), "--output_dir", str(w["root"] / "t"), "--cpu",
        "--no_progress_bar"], "no-such-frames"),
    "train: bad --network_overrides": ("train_unconditional", lambda w: [
        "--dataset", w["frames"], "--output_dir", str(w["root"] / "t"), "--network_overrides", "[1]"],
        "--network_overrides"),
    "evaluate: --model folder is not a pipeline": ("evaluate", lambda w: _fid(
        w, "--model", str(w["root"] / "not-a-pipeline")), "not-a-pipeline"),
    "evaluate: --model with a truncated model.safetensors": ("evaluate", lambda w: _fid(
        w, "--model", str(w["root"] / "truncated")), "truncated"),
    "evaluate: --model with a malformed model_index.json": ("evaluate", lambda w: _fid(
        w, "--model", str(w["root"] / "malformed")), "model_index.json"),
    "evaluate: nonexistent --model": ("evaluate", lambda w: _fid(w, "--model", str(w["root"] / "nothing")), "nothing"),
    "evaluate: --model and --images": ("evaluate", lambda w: _fid(
        w, "--model", w["model"], "--images", w["model"]), "--images"),
    "evaluate: --images not images": ("evaluate", lambda w: _fid(
        w, "--images", str(w["root"] / "not-a-pipeline")), "not-a-pipeline"),
    "evaluate: bad --seeds": ("evaluate", lambda w: _fid(w, "--model", w["model"], "--seeds", "9-1"), "seed"),
    "evaluate: nonexistent --dataset": ("evaluate", lambda w: [
        "optimal-fid", "--dataset", str(w["root"] / "no-frames"), "--cache_dir", w["cache"]], "no-frames"),
    "evaluate: unknown --split": ("evaluate", lambda w: [
        "optimal-fid", "--dataset", w["frames"], "--split", "valid", "--cache_dir", w["cache"]], "valid"),
    "evaluate: sweep nonexistent --config": ("evaluate", lambda w: [
        "sweep", "--config", str(w["root"] / "sweep.yaml")], "sweep.yaml"),
    "build: existing output without --overwrite": ("build_echonet_frames", lambda w: [
        "--echonet_dir", w["echonet"], "--output_dir", w["frames"], "--num_workers", "1"], "--overwrite"),
    "build: nonexistent --echonet_dir": ("build_echonet_frames", lambda w: [
        "--echonet_dir", str(w["root"] / "no-echonet"), "--output_dir", str(w["root"] / "f2")], "no-echonet"),
    "build: --push_to_hub without the agreement": ("build_echonet_frames", lambda w: [
        "--echonet_dir", w["echonet"], "--output_dir", str(w["root"] / "f3"), "--push_to_hub", "me/x"],
        "--agree_to_research_use_agreement"),
    "build: --max_bad_fraction inf": ("build_echonet_frames", lambda w: [
        "--echonet_dir", w["echonet"], "--output_dir", str(w["root"] / "f4"), "--max_bad_fraction", "inf"],
        "--max_bad_fraction"),
    "synthetic: existing output without --overwrite": ("make_synthetic_echonet", lambda w: [
        "--output_dir", w["echonet"], "--num_videos", "1"], "overwrite"),
    "synthetic: --num_videos 0": ("make_synthetic_echonet", lambda w: [
        "--output_dir", str(w["root"] / "s0"), "--num_videos", "0"], "num_videos"),
    "convert: nonexistent checkpoint": ("convert_edm_checkpoint", lambda w: [
        str(w["root"] / "absent.pkl"), str(w["root"] / "c")], "absent.pkl"),
    "convert: not a state_dict": ("convert_edm_checkpoint", lambda w: [
        str(w["root"] / "list.pt"), str(w["root"] / "c")], "list.pt"),
    "convert: unknown file kind": ("convert_edm_checkpoint", lambda w: [
        str(w["root"] / "a-file.txt"), str(w["root"] / "c")], "a-file.txt"),
    "discriminator: bad --stages": ("train_discriminator", lambda w: _disc(w, "--stages", "train,bake"), "--stages"),
    "discriminator: --dg_weight_first_order nan": ("train_discriminator", lambda w: _disc(
        w, "--dg_weight_first_order", "nan"), "--dg_weight_first_order"),
    "discriminator: neither --fake nor --generate_fake": ("train_discriminator", lambda w: _disc(
        w, "--stages", "train"), "--fake"),
    "discriminator: --model not a pipeline": ("train_discriminator", lambda w: [
        "--model", str(w["root"] / "not-a-pipeline"), "--dataset", w["frames"], "--output_dir",
        str(w["root"] / "dg")], "not-a-pipeline"),
    "discriminator: export with no checkpoint": ("train_discriminator", lambda w: _disc(
        w, "--stages", "export"), "checkpoints"),
    "audit: nonexistent --generated": ("audit_memorization", lambda w: [
        "--dataset", w["frames"], "--generated", str(w["root"] / "no-samples"), "--output_dir",
        str(w["root"] / "a")], "no-samples"),
    "shift: --generated without NAME=": ("evaluate_distribution_shift", lambda w: [
        "--dataset", w["frames"], "--generated", w["model"], "--output_dir", str(w["root"] / "d")], "--generated"),
    "shift: nonexistent --generated path": ("evaluate_distribution_shift", lambda w: [
        "--dataset", w["frames"], "--generated", f"Pre-DG={w['root'] / 'no-samples'}", "--output_dir",
        str(w["root"] / "d")], "no-samples"),
    "demo: --duration_kimg inf": ("demo", lambda w: ["--duration_kimg", "inf"], "--duration_kimg"),
    "demo: --num_generated 1": ("demo", lambda w: ["--num_generated", "1", "--output_dir", str(w["root"] / "demo")],
                                "num_generated"),
    "app: --port not a number": ("app", lambda w: ["--port", "http"], "--port"),
}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_named_error_line_exit_2(case, ws, capsys, fresh_accelerate_state):
    script, argv, named = CASES[case]
    main = importlib.import_module(script).main
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv(ws))
    assert exit_info.value.code == 2
    assert named in _one_error_line(capsys)


@pytest.mark.parametrize("script, argv, named", [
    ("build_echonet_frames.py", lambda w: ["--echonet_dir", w["echonet"], "--output_dir", w["frames"]], "--overwrite"),
    ("convert_edm_checkpoint.py", lambda w: [str(w["root"] / "absent.pkl"), str(w["root"] / "c")], "absent.pkl"),
    ("train_unconditional.py", lambda w: ["--dataset", w["frames"], "--output_dir", "x", "--duration_kimg", "inf"],
     "--duration_kimg"),
])
def test_scripts_run_main_through_run_cli(script, argv, named, ws):
    """The ``__main__`` wiring itself: a real process, its exit status and its whole stderr."""
    proc = subprocess.run([sys.executable, str(REPO / script), *argv(ws)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and named in lines[0], proc.stderr


def test_every_script_uses_run_cli_and_no_bare_exit():
    for script in SCRIPTS:
        source = (REPO / f"{script}.py").read_text()
        main_block = source[source.index('if __name__ == "__main__":'):]
        assert "run_cli(main)" in main_block, script
        assert not re.search(r"raise SystemExit\(|sys\.exit\(", source), script


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def _parsers_of(script: str, monkeypatch) -> list[argparse.ArgumentParser]:
    """The script's parser (and its subcommands'), caught where ``main`` parses."""
    def capture(self, *args, **kwargs):
        raise _Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    module = importlib.import_module(script)
    with pytest.raises(_Captured) as caught:
        module.main(["--help"])
    monkeypatch.undo()
    parser = caught.value.parser
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [parser] + [p for action in subcommands for p in action.choices.values()]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_keeps_docstring_lines_and_shows_each_default_once(script, monkeypatch):
    parsers = _parsers_of(script, monkeypatch)
    top_help = parsers[0].format_help()
    source = (REPO / f"{script}.py").read_text()
    docstring = source.split('"""')[1]
    for line in docstring.splitlines():
        if line.rstrip().endswith("\\"):  # an example continued on the next line stays two lines
            assert line.rstrip().rstrip("\\").rstrip() + " \\" in top_help.replace("\\\\", "\\"), (script, line)
    for parser in parsers:
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            text = formatter._format_action(action)  # the option's entry in --help
            flag = action.option_strings[-1]
            assert text.lower().count("default") <= 1, (script, flag, text)
            takes_value = action.nargs != 0
            if takes_value and not action.required and all(action.default is not v for v in (None, argparse.SUPPRESS)):
                assert "default" in text.lower(), (script, flag, text)


def test_help_of_training_shows_defaults_once():
    """``train_unconditional.py --help`` (all flags derived from TrainConfig) in a real process."""
    proc = subprocess.run([sys.executable, str(REPO / "train_unconditional.py"), "--help"], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0
    entries = re.split(r"\n  (?=-)", proc.stdout)
    assert len(entries) > 40
    for entry in entries:
        assert entry.lower().count("(default") <= 1, entry
    assert "train_unconditional.py \\\n" in proc.stdout



def test_pip_builds_a_wheel_of_the_pipelines_package(tmp_path):
    """``pip install .`` from a fresh clone: package discovery is stated (no flat-layout error), and the wheel
    holds every module of ``pipelines`` (the components a saved pipeline copies included), nothing else."""
    import shutil
    import zipfile

    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    clone = tmp_path / "clone"
    for name in listed:
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "wheels"), str(clone)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "wheels").glob("echodiff-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    modules = {name for name in listed if name.startswith("pipelines/") and name.endswith(".py")}
    assert {f"pipelines/components/{p.name}" for p in (REPO / "pipelines" / "components").glob("*.py")} <= names
    assert modules <= names
    assert {name.split("/")[0] for name in names} == {"pipelines", wheel.name.split("-py3")[0] + ".dist-info"}
    assert "Requires-Dist: diffusers" in metadata


def test_colon_pair_flags_read_pairs_and_name_what_they_expect():
    from pipelines.cli import interval_list_arg, weight_pair_list_arg

    assert interval_list_arg("0:inf, 0.28:5.42") == [(0.0, math.inf), (0.28, 5.42)]
    assert weight_pair_list_arg("2:1,3:2") == [(2.0, 1.0), (3.0, 2.0)]
    for parse, text, message in [(interval_list_arg, "5:1", "needs 0 <= LO <= HI"),
                                 (interval_list_arg, ",", "expected sigma intervals LO:HI"),
                                 (interval_list_arg, "0:1:2", "expected sigma intervals LO:HI"),
                                 (weight_pair_list_arg, "2", "expected weight pairs A:B"),
                                 (weight_pair_list_arg, "nan:1", "expected finite weight pairs")]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(text)
