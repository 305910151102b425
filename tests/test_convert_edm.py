"""EDM checkpoint conversion: key names built here from EDM's naming rules, independently of our models."""

import pickle
import re
import sys

import pytest
import torch

from convert_edm_checkpoint import main as cli_main
from pipelines.components.unet_adm import ADMUNet2DModel
from pipelines.components.unet_song import SongUNet2DModel
from pipelines.convert_edm import (
    EDMConversionError,
    convert_edm_checkpoint,
    convert_edm_state_dict,
    infer_edm_config,
)
from pipelines.networks import build_network

PAPER_COUNTS = {"adm": 295_124_353, "ddpmpp": 55_725_825, "ncsnpp": 56_384_001}


def _filter_2d(taps):
    f = torch.tensor(taps, dtype=torch.float32)
    return (torch.outer(f, f) / f.sum() ** 2)[None, None]


class EDMLayout:
    """Names and shapes of an EDM SongUNet / DhariwalUNet state_dict (training/networks.py naming rules).

    Values: parameters are shapes; ``*.resample_filter`` buffers and ``map_noise.freqs`` are tensors.
    """

    def __init__(self, taps):
        self.entries = {}
        self.taps = taps

    def linear(self, name, fan_in, fan_out, bias=True):
        self.entries[f"{name}.weight"] = (fan_out, fan_in)
        if bias:
            self.entries[f"{name}.bias"] = (fan_out,)

    def conv(self, name, cin, cout, kernel, resample=False):
        if kernel:
            self.entries[f"{name}.weight"] = (cout, cin, kernel, kernel)
            self.entries[f"{name}.bias"] = (cout,)
        if resample:
            self.entries[f"{name}.resample_filter"] = _filter_2d(self.taps)

    def norm(self, name, channels):
        self.entries[f"{name}.weight"] = (channels,)
        self.entries[f"{name}.bias"] = (channels,)

    def block(self, name, cin, cout, emb, attention=False, resample=False, adaptive=False, resample_proj=False):
        self.norm(f"{name}.norm0", cin)
        self.conv(f"{name}.conv0", cin, cout, 3, resample)
        self.linear(f"{name}.affine", emb, cout * (2 if adaptive else 1))
        self.norm(f"{name}.norm1", cout)
        self.conv(f"{name}.conv1", cout, cout, 3)
        if cin != cout or resample:
            self.conv(f"{name}.skip", cin, cout, 1 if (resample_proj or cin != cout) else 0, resample)
        if attention:
            self.norm(f"{name}.norm2", cout)
            self.conv(f"{name}.qkv", cout, 3 * cout, 1)
            self.conv(f"{name}.proj", cout, cout, 1)


def edm_song_layout(res, channels, mc, mult, nb, attn, fourier, residual, taps, label_dim=0):
    lay = EDMLayout(taps)
    emb, noise = 4 * mc, (2 if fourier else 1) * mc
    blk = dict(emb=emb, resample_proj=True)
    if fourier:
        lay.entries["map_noise.freqs"] = torch.randn(noise // 2) * 16
    if label_dim:
        lay.linear("map_label", label_dim, noise)
    lay.linear("map_layer0", noise, emb)
    lay.linear("map_layer1", emb, emb)
    skips, cout, caux = [], channels, channels
    for level, m in enumerate(mult):
        r = res >> level
        if level == 0:
            lay.conv(f"enc.{r}x{r}_conv", cout, mc, 3)
            cout = mc
        else:
            lay.block(f"enc.{r}x{r}_down", cout, cout, resample=True, **blk)
            if residual:
                lay.conv(f"enc.{r}x{r}_aux_residual", caux, cout, 3, resample=True)
                caux = cout
        skips.append(cout)
        for i in range(nb):
            lay.block(f"enc.{r}x{r}_block{i}", cout, mc * m, attention=r in attn, **blk)
            cout = mc * m
            skips.append(cout)
    for level in reversed(range(len(mult))):
        r, m = res >> level, mult[level]
        if level == len(mult) - 1:
            lay.block(f"dec.{r}x{r}_in0", cout, cout, attention=True, **blk)
            lay.block(f"dec.{r}x{r}_in1", cout, cout, **blk)
        else:
            lay.block(f"dec.{r}x{r}_up", cout, cout, resample=True, **blk)
        for i in range(nb + 1):
            lay.block(f"dec.{r}x{r}_block{i}", cout + skips.pop(), mc * m, attention=(i == nb and r in attn), **blk)
            cout = mc * m
    lay.norm(f"dec.{res}x{res}_aux_norm", cout)
    lay.conv(f"dec.{res}x{res}_aux_conv", cout, channels, 3)
    return lay.entries


def edm_adm_layout(res, channels, mc, mult, nb, attn, label_dim=0):
    lay = EDMLayout((1, 1))
    emb = 4 * mc
    blk = dict(emb=emb, adaptive=True)
    lay.linear("map_layer0", mc, emb)
    lay.linear("map_layer1", emb, emb)
    if label_dim:
        lay.linear("map_label", label_dim, emb, bias=False)
    skips, cout = [], channels
    for level, m in enumerate(mult):
        r = res >> level
        if level == 0:
            lay.conv(f"enc.{r}x{r}_conv", cout, mc * m, 3)
            cout = mc * m
        else:
            lay.block(f"enc.{r}x{r}_down", cout, cout, resample=True, **blk)
        skips.append(cout)
        for i in range(nb):
            lay.block(f"enc.{r}x{r}_block{i}", cout, mc * m, attention=r in attn, **blk)
            cout = mc * m
            skips.append(cout)
    for level in reversed(range(len(mult))):
        r, m = res >> level, mult[level]
        if level == len(mult) - 1:
            lay.block(f"dec.{r}x{r}_in0", cout, cout, attention=True, **blk)
            lay.block(f"dec.{r}x{r}_in1", cout, cout, **blk)
        else:
            lay.block(f"dec.{r}x{r}_up", cout, cout, resample=True, **blk)
        for i in range(nb + 1):
            lay.block(f"dec.{r}x{r}_block{i}", cout + skips.pop(), mc * m, attention=r in attn, **blk)
            cout = mc * m
    lay.norm("out_norm", cout)
    lay.conv("out_conv", cout, channels, 3)
    return lay.entries


def edm_layout(arch, res=16, channels=1, mc=8, mult=(1, 2), nb=1, attn=None, label_dim=0):
    if arch == "adm":
        return edm_adm_layout(res, channels, mc, mult, nb, attn or (res, res // 2), label_dim)
    ncsn = arch == "ncsnpp"
    return edm_song_layout(res, channels, mc, mult, nb, attn or (res // 2,), fourier=ncsn, residual=ncsn,
                           taps=(1, 3, 3, 1) if ncsn else (1, 1), label_dim=label_dim)


def random_state(layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: v.clone() if isinstance(v, torch.Tensor) else torch.randn(v, generator=gen) for k, v in layout.items()}


@pytest.mark.parametrize("arch", ["adm", "ddpmpp", "ncsnpp"])
def test_paper_size_layout_is_our_layout(arch):
    """At paper size, EDM's names are exactly ours (+ derived filter buffers), with the same shapes."""
    kwargs = dict(res=64, mc=192, mult=(1, 2, 3, 4), nb=3, attn=(32, 16, 8)) if arch == "adm" else \
        dict(res=64, mc=128, mult=(2, 2, 2), nb=4, attn=(16,))
    with torch.device("meta"):
        layout = edm_layout(arch, **kwargs)
        ours = build_network(arch).state_dict()
    weights = {k: v for k, v in layout.items() if not k.endswith("resample_filter")}
    assert sum(torch.Size(v).numel() for k, v in weights.items() if k != "map_noise.freqs") == PAPER_COUNTS[arch]
    assert set(weights) == set(ours)
    for key, value in weights.items():
        shape = value.shape if isinstance(value, torch.Tensor) else torch.Size(value)
        assert ours[key].shape == shape, key


@pytest.mark.parametrize("arch,label_dim", [("adm", 0), ("ddpmpp", 0), ("ncsnpp", 0), ("adm", 2), ("ncsnpp", 1)])
def test_convert_state_dict_file(arch, label_dim, tmp_path):
    state = random_state(edm_layout(arch, label_dim=label_dim))
    src = tmp_path / "edm_net.pt"
    torch.save({f"model.{k}": v for k, v in state.items()}, src)  # as saved from EDMPrecond
    out = tmp_path / "converted"
    heads = {"channels_per_head": 4} if arch == "adm" else {}  # not stored in the weights (EDM: 64)
    convert_edm_checkpoint(src, out, arch=arch, dropout=0.13, **heads)

    model_class = ADMUNet2DModel if arch == "adm" else SongUNet2DModel
    model = model_class.from_pretrained(out)
    cfg = model.config
    assert (cfg.sample_size, cfg.in_channels, cfg.out_channels, cfg.model_channels) == (16, 1, 1, 8)
    assert list(cfg.channel_mult) == [1, 2] and cfg.num_blocks == 1 and cfg.label_dim == label_dim
    assert cfg.dropout == 0.13
    if arch == "adm":
        assert list(cfg.attn_resolutions) == [16, 8]
    else:
        assert list(cfg.attn_resolutions) == [8]
        expected = ("fourier", 2, "residual", [1, 3, 3, 1]) if arch == "ncsnpp" else ("positional", 1, "standard", [1, 1])
        assert (cfg.embedding_type, cfg.channel_mult_noise, cfg.encoder_type, list(cfg.resample_filter)) == expected
    ours = model.state_dict()
    for key, tensor in state.items():
        if key.endswith("resample_filter"):
            assert key not in ours
        else:
            assert torch.equal(ours[key], tensor), key
    assert len(ours) == sum(not k.endswith("resample_filter") for k in state)
    x = torch.randn(2, 1, 16, 16)
    labels = torch.rand(2, label_dim) if label_dim else None
    assert model(x, torch.tensor([0.1, 0.2]), class_labels=labels).sample.shape == x.shape


def test_inferred_arch_without_hint():
    for arch in ("adm", "ddpmpp", "ncsnpp"):
        inferred, config = infer_edm_config(random_state(edm_layout(arch, channels=3, res=32)))
        assert inferred == arch and config["sample_size"] == 32 and config["in_channels"] == 3


def _expect_refusal(state, match, tmp_path, **kwargs):
    src = tmp_path / "bad.pt"
    torch.save(state, src)
    out = tmp_path / "never_written"
    with pytest.raises(EDMConversionError, match=match):
        convert_edm_checkpoint(src, out, **kwargs)
    assert not out.exists()


def test_refuses_unknown_key(tmp_path):
    state = random_state(edm_layout("ddpmpp"))
    state["enc.16x16_block0.extra.weight"] = torch.zeros(3)
    _expect_refusal(state, r"unknown key\(s\): enc\.16x16_block0\.extra\.weight", tmp_path)


def test_refuses_missing_key(tmp_path):
    state = random_state(edm_layout("adm"))
    del state["dec.8x8_block1.affine.bias"]
    _expect_refusal(state, r"missing key\(s\): dec\.8x8_block1\.affine\.bias", tmp_path, channels_per_head=4)


def test_refuses_misshaped_tensor(tmp_path):
    state = random_state(edm_layout("ncsnpp"))
    state["dec.16x16_block0.conv1.weight"] = torch.zeros(8, 8, 1, 1)
    _expect_refusal(state, r"mis-shaped.*dec\.16x16_block0\.conv1\.weight \(8, 8, 1, 1\) \(expected \(8, 8, 3, 3\)\)",
                    tmp_path)


def test_refuses_wrong_filter_and_wrong_arch_and_augment(tmp_path):
    state = random_state(edm_layout("ncsnpp"))
    _expect_refusal(state, "'ncsnpp' network", tmp_path, arch="ddpmpp")
    bad = dict(state)
    key = "enc.8x8_down.conv0.resample_filter"
    bad[key] = bad[key] * 2
    _expect_refusal(bad, key.replace(".", r"\."), tmp_path)
    with_augment = {**state, "map_augment.weight": torch.zeros(16, 9)}
    _expect_refusal(with_augment, "map_augment.weight", tmp_path)
    model = convert_edm_state_dict(with_augment, drop_augment=True)
    assert "map_augment.weight" not in model.state_dict()


def test_refuses_non_state_dict(tmp_path):
    src = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], src)
    with pytest.raises(EDMConversionError, match="expected a state_dict"):
        convert_edm_checkpoint(src, tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_edm_checkpoint(tmp_path / "absent.pt", tmp_path / "o")
    truncated = tmp_path / "truncated.pt"
    torch.save(random_state(edm_layout("adm")), truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(EDMConversionError, match="truncated.pt"):
        convert_edm_checkpoint(truncated, tmp_path / "o")


# --- EDM network-snapshot pickles, written here as EDM's torch_utils.persistence writes them -------------

EDM_PERSISTENCE_VERSION = 6


def _reconstruct_persistent_obj(meta):  # stands in for EDM's; the converter must never call it
    raise AssertionError("the converter ran EDM's reconstruction code")


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"


class EDMPersistent(torch.nn.Module):
    """A module that pickles as ``@persistence.persistent_class`` does: the reduce call
    ``_reconstruct_persistent_obj(meta)`` with the class's source, its name and the object's ``__dict__``."""

    def __init__(self, class_name, module_src, **init_kwargs):
        super().__init__()
        self._init_args, self._init_kwargs = (), dict(init_kwargs)
        self.edm_class_name, self.edm_module_src = class_name, module_src

    def __reduce__(self):
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("edm_")}
        meta = dict(type="class", version=EDM_PERSISTENCE_VERSION, module_src=self.edm_module_src,
                    class_name=self.edm_class_name, state=state)
        return _reconstruct_persistent_obj, (meta,), None


@pytest.fixture
def edm_persistence_module(monkeypatch):
    """``torch_utils.persistence`` importable while pickling (as in EDM's process), never while converting."""
    import types

    package, module = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package.persistence = module
    monkeypatch.setitem(sys.modules, "torch_utils", package)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", module)


def edm_network(state, class_name, module_src, **init_kwargs):
    """EDM's module tree for a flat state_dict: persistent modules, ``enc`` / ``dec`` as torch ModuleDicts."""
    root = EDMPersistent(class_name, module_src, **init_kwargs)
    for key, value in state.items():
        *path, leaf = key.split(".")
        module = root
        for depth, part in enumerate(path):
            if part not in module._modules:
                child = torch.nn.ModuleDict() if depth == 0 and part in ("enc", "dec") else \
                    EDMPersistent("Conv2d", module_src)
                module.add_module(part, child)
            module = module._modules[part]
        if leaf in ("resample_filter", "freqs"):
            module.register_buffer(leaf, value.clone())
        else:
            module.register_parameter(leaf, torch.nn.Parameter(value.clone()))
    root.register_buffer("scratch", torch.ones(3), persistent=False)  # not in EDM's state_dict: not converted
    return root


@pytest.mark.parametrize("protocol", [2, 4])
def test_edm_snapshot_pickle_converts_without_running_its_code(tmp_path, edm_persistence_module, monkeypatch,
                                                               protocol):
    marker = tmp_path / "embedded-source-ran"
    module_src = f"open({str(marker)!r}, 'w').write('ran')\n"  # what unpickling with EDM's code would exec
    state = random_state(edm_layout("ddpmpp"))
    init_kwargs = dict(img_resolution=16, in_channels=1, out_channels=1, dropout=0.13, label_dropout=0.0,
                       embedding_type="positional", augment_dim=0)
    unet = edm_network(state, "SongUNet", module_src, **init_kwargs)
    precond = EDMPersistent("EDMPrecond", module_src, img_resolution=16, img_channels=1, model_type="SongUNet")
    precond.add_module("model", unet)
    snapshot = {"ema": precond, "loss_fn": EDMPersistent("EDMLoss", module_src, P_mean=-1.2, P_std=1.2),
                "augment_pipe": None, "dataset_kwargs": {"class_name": "training.dataset.ImageFolderDataset"}}
    pkl = tmp_path / "network-snapshot-000100.pkl"
    with open(pkl, "wb") as handle:
        pickle.dump(snapshot, handle, protocol=protocol)
    monkeypatch.delitem(sys.modules, "torch_utils.persistence")  # the converter has no EDM checkout:
    monkeypatch.setitem(sys.modules, "torch_utils", None)  # importing it would fail loudly

    model = convert_edm_checkpoint(pkl, tmp_path / "out")
    assert not marker.exists()
    assert model.config.dropout == 0.13
    converted = model.state_dict()
    for key, value in state.items():
        if not key.endswith("resample_filter"):
            assert torch.equal(converted[key], value), key


class _Payload:
    """Unpickling this runs ``call(*args)``: the classic pickle exploit."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


@pytest.mark.parametrize("kind", ["exec", "os.system", "inside an EDM record", "a class of an EDM checkout"])
def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path, kind, edm_persistence_module):
    import os

    marker = tmp_path / "pwned"
    if kind == "exec":
        payload, named = _Payload(exec, f"open({str(marker)!r}, 'w').write('x')"), "builtins.exec"
    elif kind == "os.system":
        payload, named = _Payload(os.system, f"touch {marker}"), f"{os.system.__module__}.system"
    elif kind == "inside an EDM record":
        net = EDMPersistent("SongUNet", "")
        net.evil = _Payload(exec, f"open({str(marker)!r}, 'w').write('x')")
        payload, named = net, "builtins.exec"
    else:
        payload, named = _Payload(pathlib_write, str(marker)), f"{__name__}.pathlib_write"
    pkl = tmp_path / "network-snapshot-000000.pkl"
    with open(pkl, "wb") as handle:
        pickle.dump({"ema": payload}, handle)
    with pytest.raises(EDMConversionError, match=f"refusing global {re.escape(named)}"):
        convert_edm_checkpoint(pkl, tmp_path / "o")
    assert not marker.exists()
    assert not (tmp_path / "o").exists()


def pathlib_write(path):
    """A function of some importable module (as a stand-in EDM checkout's would be)."""
    from pathlib import Path

    Path(path).write_text("x")


def test_cli(tmp_path, capsys):
    src = tmp_path / "net.pt"
    torch.save(random_state(edm_layout("adm")), src)
    cli_main([str(src), str(tmp_path / "out"), "--arch", "adm", "--set", "channels_per_head=4", "--set", "dropout=0.1"])
    assert "ADMUNet2DModel" in capsys.readouterr().out
    model = ADMUNet2DModel.from_pretrained(tmp_path / "out")
    assert model.config.channels_per_head == 4 and model.config.dropout == 0.1
