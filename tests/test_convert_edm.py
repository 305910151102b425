"""EDM checkpoint conversion: key names built here from EDM's naming rules, independently of our models."""

import pickle
import textwrap

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


def test_refuses_non_state_dict_and_pickle_without_edm(tmp_path, monkeypatch):
    src = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], src)
    with pytest.raises(EDMConversionError, match="expected a state_dict"):
        convert_edm_checkpoint(src, tmp_path / "o")
    pkl = tmp_path / "network-snapshot-000000.pkl"
    pkl.write_bytes(b"not read")
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("dnnlib", "torch_utils") else real_find_spec(name, *a))
    with pytest.raises(EDMConversionError, match="PYTHONPATH"):
        convert_edm_checkpoint(pkl, tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_edm_checkpoint(tmp_path / "absent.pt", tmp_path / "o")


def test_pickle_snapshot_with_edm_checkout_importable(tmp_path, monkeypatch):
    """A stand-in EDM checkout: snapshot dict -> 'ema' wrapper -> .model with init_kwargs (EDM's persistence)."""
    checkout = tmp_path / "edm"
    for package in ("dnnlib", "torch_utils"):
        (checkout / package).mkdir(parents=True)
        (checkout / package / "__init__.py").write_text("")
    (checkout / "fake_edm_networks.py").write_text(textwrap.dedent("""
        import torch

        class FakeSongUNet(torch.nn.Module):
            def __init__(self, state, **init_kwargs):
                super().__init__()
                self.state = state
                self.init_kwargs = init_kwargs

            def state_dict(self, *args, **kwargs):
                return dict(self.state)

        class FakePrecond(torch.nn.Module):
            def __init__(self, model):
                super().__init__()
                self.model = model
    """))
    monkeypatch.syspath_prepend(str(checkout))
    import fake_edm_networks

    state = random_state(edm_layout("ddpmpp"))
    unet = fake_edm_networks.FakeSongUNet(state, img_resolution=16, in_channels=1, out_channels=1, dropout=0.13,
                                          label_dropout=0.0, embedding_type="positional", augment_dim=0)
    pkl = tmp_path / "network-snapshot-000100.pkl"
    with open(pkl, "wb") as handle:
        pickle.dump({"ema": fake_edm_networks.FakePrecond(unet), "augment_pipe": None}, handle)
    model = convert_edm_checkpoint(pkl, tmp_path / "out")
    assert model.config.dropout == 0.13
    assert torch.equal(model.state_dict()["dec.16x16_aux_conv.weight"], state["dec.16x16_aux_conv.weight"])


def test_cli(tmp_path, capsys):
    src = tmp_path / "net.pt"
    torch.save(random_state(edm_layout("adm")), src)
    cli_main([str(src), str(tmp_path / "out"), "--arch", "adm", "--set", "channels_per_head=4", "--set", "dropout=0.1"])
    assert "ADMUNet2DModel" in capsys.readouterr().out
    model = ADMUNet2DModel.from_pretrained(tmp_path / "out")
    assert model.config.channels_per_head == 4 and model.config.dropout == 0.1
