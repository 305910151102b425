"""Smoke test of the benchmark suite: ``--quick`` on tiny networks gives every row, finite numbers, and a table
that names each row. No timing assertions (CI machines differ)."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import benchmark  # noqa: E402


def _numbers(value):
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            if key != "curves":
                yield from _numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "quick.json"
    # in-process cells: a subprocess per cell costs seconds of imports each
    results = benchmark.main(["--quick", "--no_isolate", "--arch", "ddpmpp", "--arch", "adm", "--arch", "edm2-xs",
                              "--json", str(path)])
    return results, json.loads(path.read_text())


def test_quick_suite_has_every_row_with_finite_numbers(quick_run):
    _, saved = quick_run
    for row in ("ceiling", "networks", "optim", "dg", "losscurve", "inception", "data"):
        assert row in saved, f"row {row} missing from the JSON"
        assert "error" not in saved[row], saved[row]
    cells = {(c["arch"], c["precision"]) for c in saved["networks"]}
    assert cells == {(a, p) for a in ("ddpmpp", "adm", "edm2-xs") for p in ("fp32", "bf16")}
    for cell in saved["networks"]:
        assert "error" not in cell, cell
        for key in ("train_img_s", "train_gflop_s", "sample_img_nfe_s", "sample_gflop_s", "peak_rss_gib"):
            assert cell[key] > 0 and math.isfinite(cell[key]), (cell["arch"], key, cell[key])
    numbers = list(_numbers({k: v for k, v in saved.items() if k not in ("meta", "table")}))
    assert numbers and all(math.isfinite(x) for x in numbers)
    # Inception-v3 at 299x299 is ~5.7 G multiply-adds (Szegedy et al. 2016; torchvision's 5.71 "GFLOPS"), 2 FLOPs each.
    assert 10.5 < saved["inception"]["gflop_per_img"] < 12.5
    curve = saved["losscurve"]
    assert curve["all_losses_finite"] and len(curve["curves"]["fp32"]) == len(curve["curves"]["bf16"]) == 4


def test_without_an_edm_checkout_there_is_no_ratio(quick_run):
    _, saved = quick_run
    rows = [line for line in saved["table"].splitlines() if line.startswith(("| train |", "| sample |"))]
    assert rows and all(line.rstrip().endswith("| - |") for line in rows)
    assert "edm_reference" not in saved


FAKE_EDM = {  # the two modules benchmark.py imports from an NVlabs EDM checkout, as stand-ins of known speed
    "training/__init__.py": "",
    "training/networks.py": """
import time
import torch
class EDMPrecond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0, dropout=0.0, **model_kwargs):
        super().__init__()
        assert model_kwargs["model_type"] == "SongUNet" and model_kwargs["resample_filter"] == [1, 1]
        self.conv = torch.nn.Conv2d(img_channels, img_channels, 3, padding=1)
    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        time.sleep(0.05 * x.shape[0])  # 20 img*NFE/s whatever the machine
        return self.conv(x)
""",
    "training/loss.py": """
class EDMLoss:
    def __call__(self, net, images, labels=None, augment_pipe=None):
        return (net(images, None) - images) ** 2
""",
}


def test_edm_checkout_is_measured_in_the_same_run_and_gives_the_ratio(tmp_path):
    for name, text in FAKE_EDM.items():
        (tmp_path / "edm" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "edm" / name).write_text(text)
    results = benchmark.main(["--quick", "--no_isolate", "--only", "sample", "--arch", "ddpmpp", "--precision", "fp32",
                              "--edm_checkout", str(tmp_path / "edm"), "--json", str(tmp_path / "r.json")])
    (reference,) = results["edm_reference"]
    assert reference["sample_img_nfe_s"] == pytest.approx(20.0, rel=0.3)
    ours = results["networks"][0]["sample_img_nfe_s"]
    sample_row = next(line for line in results["table"].splitlines() if line.startswith("| sample |"))
    assert sample_row.rstrip().endswith(f"| {ours / reference['sample_img_nfe_s']:.2f} |")
    assert "| edm-ref sample | NVlabs EDM ddpmpp fp32" in results["table"]


def test_flop_count_matches_closed_form_for_a_single_conv():
    # An independent closed form: a 3x3 conv C->C on HxW costs 2*C*C*9*H*W FLOPs per image (forward).
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    conv = torch.nn.Conv2d(16, 16, 3, padding=1, bias=False)
    with FlopCounterMode(display=False) as counter:
        conv(torch.randn(2, 16, 8, 8))
    assert counter.get_total_flops() / 2 == 2 * 16 * 16 * 9 * 8 * 8
    # And the paper-size count of DDPM++ lands where the estimate puts it (~500 GFLOP per training image).
    flops = benchmark.count_flops("ddpmpp", channels=3, resolution=64, quick=False)
    assert 450 < flops["train_gflop_per_img"] < 550
    assert 2.8 < flops["train_gflop_per_img"] / flops["forward_gflop_per_img"] < 3.2  # backward ~ 2x forward


def test_table_names_every_row_and_merge_concatenates(quick_run, tmp_path):
    _, saved = quick_run
    table = saved["table"]
    for row in ("| ceiling |", "| train |", "| sample |", "| optim |", "| dg |", "| losscurve |", "| inception |",
                "| data |"):
        assert row in table, row
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({**saved, "networks": saved["networks"][:1]}))
    second.write_text(json.dumps({"meta": saved["meta"], "networks": saved["networks"][1:]}))
    merged = benchmark.main(["--merge", str(first), str(second), "--json", str(tmp_path / "m.json")])
    assert len(merged["networks"]) == len(saved["networks"])
    assert merged["table"].count("| train |") == len(saved["networks"])


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--reps", "0"])
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--only", "nonsense"])


@pytest.mark.parametrize("options,label", [(["--sdpa", "math"], "[sdpa=math]"),
                                           (["--grad_ckpt", "--optimizer", "foreach"], "[grad_ckpt, optimizer=foreach]")])
def test_network_options_run_and_are_named(options, label, tmp_path):
    # Each timed step enters the option's context again (sdpa_kernel's context manager is single-use).
    path = tmp_path / "opt.json"
    benchmark.main(["--quick", "--no_isolate", "--only", "train", "--only", "sample", "--arch", "adm",
                    "--precision", "fp32", "--reps", "2", "--json", str(path), *options])
    saved = json.loads(path.read_text())
    cell = saved["networks"][0]
    assert "error" not in cell, cell
    assert cell["train_img_s"] > 0 and cell["sample_img_nfe_s"] > 0
    assert label in saved["table"]  # the non-default options show in the row's name
