"""The three paper networks: exact sizes, shapes, init, conditioning, precision, checkpointing, save/load."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipelines.components import layers
from pipelines.components.unet_adm import ADMUNet2DModel
from pipelines.components.unet_song import SongUNet2DModel
from pipelines.networks import ARCHITECTURES, build_network, tiny_config

ARCHS = ["adm", "ddpmpp", "ncsnpp"]
# Issue 3 / paper Table 1 (295.1M, 55.7M, 56.4M), at 64x64, unconditional.
PAPER_COUNTS = {
    ("adm", 1): 295_124_353, ("ddpmpp", 1): 55_725_825, ("ncsnpp", 1): 56_384_001,
    ("adm", 3): 295_131_267, ("ddpmpp", 3): 55_732_739, ("ncsnpp", 3): 56_395_523,
}


def tiny(arch, channels=1, resolution=16, **overrides):
    torch.manual_seed(0)
    return build_network(arch, channels=channels, **{**tiny_config(arch, resolution), **overrides})


def perturb_(model, scale=0.05, seed=1):
    """Move every weight off its init (ADM's zero-initialised layers would otherwise block all gradients)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


@pytest.mark.parametrize("arch,channels", sorted(PAPER_COUNTS))
def test_paper_parameter_counts(arch, channels):
    with torch.device("meta"):
        net = build_network(arch, resolution=64, channels=channels)
    assert sum(p.numel() for p in net.parameters()) == PAPER_COUNTS[(arch, channels)]
    assert not any("augment" in name for name, _ in net.named_parameters())
    if channels == 1:
        assert ARCHITECTURES[arch].num_parameters == PAPER_COUNTS[(arch, 1)]


def test_class_defaults_are_the_paper_configs():
    with torch.device("meta"):
        assert sum(p.numel() for p in ADMUNet2DModel().parameters()) == PAPER_COUNTS[("adm", 1)]
        assert sum(p.numel() for p in SongUNet2DModel().parameters()) == PAPER_COUNTS[("ddpmpp", 1)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("channels,resolution", [(1, 16), (3, 32)])
def test_shape_and_determinism(arch, channels, resolution):
    net = tiny(arch, channels, resolution).eval()
    again = tiny(arch, channels, resolution).eval()
    for (name, a), (_, b) in zip(net.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randn(3, channels, resolution, resolution)
    t = torch.tensor([-1.0, 0.3, 2.0])
    out = net(x, t).sample
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.equal(out, net(x, t).sample)
    assert torch.equal(out, again(x, t, return_dict=False)[0])
    # A scalar timestep broadcasts like the explicit per-sample vector.
    assert torch.equal(net(x, 0.3).sample, net(x, torch.full((3,), 0.3)).sample)
    assert torch.equal(net(x, torch.tensor(0.3)).sample, net(x, torch.full((3,), 0.3)).sample)


@pytest.mark.parametrize("arch", ARCHS)
def test_output_layers_start_at_zero(arch):
    net = tiny(arch).eval()
    out = net(torch.randn(2, 1, 16, 16), torch.tensor([0.1, 1.0])).sample
    if arch == "adm":
        assert torch.count_nonzero(out) == 0  # zero-initialised out_conv
    else:
        assert 0 < out.abs().max() < 1e-3  # output conv scaled by 1e-5


def _uniform_bound_ok(w, bound):
    return w.abs().max() <= bound * (1 + 1e-6) and w.abs().max() > 0.9 * bound


def test_init_schemes():
    torch.manual_seed(0)
    song = SongUNet2DModel(sample_size=16, model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,))
    w = song.map_layer1.weight  # xavier-uniform: bound sqrt(6 / (fan_in + fan_out))
    assert _uniform_bound_ok(w, math.sqrt(6 / (128 + 128)))
    assert torch.count_nonzero(song.map_layer1.bias) == 0
    qkv = song.enc["8x8_block0"].qkv.weight  # (192, 64, 1, 1): xavier * sqrt(0.2)
    assert _uniform_bound_ok(qkv, math.sqrt(0.2) * math.sqrt(6 / (64 + 192)))
    conv1 = song.enc["16x16_block0"].conv1.weight  # residual-branch output: xavier * 1e-5
    assert _uniform_bound_ok(conv1, 1e-5 * math.sqrt(6 / (32 * 9 + 32 * 9)))

    adm = ADMUNet2DModel(sample_size=16, model_channels=32, channel_mult=(1, 2), num_blocks=1,
                         attn_resolutions=(8,), channels_per_head=16)
    conv0 = adm.enc["16x16_block0"].conv0  # kaiming-uniform * sqrt(1/3): bound 1 / sqrt(fan_in)
    assert _uniform_bound_ok(conv0.weight, 1 / math.sqrt(32 * 9))
    assert _uniform_bound_ok(conv0.bias, 1 / math.sqrt(32 * 9))
    assert torch.count_nonzero(adm.enc["16x16_block0"].conv1.weight) == 0
    assert torch.count_nonzero(adm.enc["8x8_block0"].proj.weight) == 0
    assert torch.count_nonzero(adm.out_conv.weight) == 0 and torch.count_nonzero(adm.out_conv.bias) == 0


def test_group_norm_groups_and_eps():
    song, adm = tiny("ddpmpp"), tiny("adm")
    assert song.enc["16x16_block0"].norm0.num_groups == 2 and song.enc["16x16_block0"].norm0.eps == 1e-6
    assert adm.enc["16x16_block0"].norm0.num_groups == 2 and adm.out_norm.eps == 1e-5
    with torch.device("meta"):
        assert build_network("adm").enc["64x64_block0"].norm0.num_groups == 32


@pytest.mark.parametrize("arch", ARCHS)
def test_noise_embedding_closed_form(arch):
    """The vector entering map_layer0 is EDM's: ADM [cos, sin], Song nets [sin, cos] of t * freqs."""
    net = tiny(arch).eval()
    t = torch.tensor([0.25, -1.5])
    captured = {}
    net.map_layer0.register_forward_pre_hook(lambda mod, args: captured.setdefault("emb", args[0]))
    net(torch.zeros(2, 1, 16, 16), t)
    n = net.map_layer0.in_features
    half = torch.arange(n // 2, dtype=torch.float64)
    if arch == "ncsnpp":
        freqs = 2 * math.pi * net.map_noise.freqs.double()
    elif arch == "ddpmpp":
        freqs = (1 / 10000) ** (half / (n // 2 - 1))  # endpoint=True
    else:
        freqs = (1 / 10000) ** (half / (n // 2))
    angles = t.double()[:, None] * freqs[None]
    first, second = (angles.cos(), angles.sin()) if arch == "adm" else (angles.sin(), angles.cos())
    # float32 angles up to ~|t| * 2 pi * 16 * 3 lose ~1e-5 absolute
    torch.testing.assert_close(captured["emb"].double(), torch.cat([first, second], 1), atol=1e-4, rtol=0)


def test_attention_matches_naive_multihead_reference():
    """qkv channels are laid out (head, channel, q/k/v) as in EDM; SDPA must equal softmax(q.k/sqrt(d)) v."""
    net = perturb_(tiny("adm"), scale=0.2).eval()
    block = net.enc["8x8_block0"]  # 16 channels, 4 per head -> 4 heads
    assert block.num_heads == 4
    seen = {}
    block.qkv.register_forward_hook(lambda mod, args, out: seen.setdefault("qkv", out))
    block.proj.register_forward_pre_hook(lambda mod, args: seen.setdefault("attn", args[0]))
    net(torch.randn(2, 1, 16, 16), torch.tensor([0.2, 0.7]))
    qkv = seen["qkv"].double()
    batch, _, h, w = qkv.shape
    heads, per_head = 4, 4
    expected = torch.zeros(batch, heads * per_head, h * w, dtype=torch.float64)
    for head in range(heads):
        def part(j, head=head):
            idx = [head * per_head * 3 + c * 3 + j for c in range(per_head)]
            return qkv[:, idx].reshape(batch, per_head, h * w)
        q, k, v = part(0), part(1), part(2)
        weights = torch.softmax(torch.einsum("bcq,bck->bqk", q, k) / math.sqrt(per_head), dim=-1)
        expected[:, head * per_head:(head + 1) * per_head] = torch.einsum("bqk,bck->bcq", weights, v)
    torch.testing.assert_close(seen["attn"].double().reshape(batch, -1, h * w), expected, atol=1e-5, rtol=1e-5)


def test_resampling_filters():
    x = torch.randn(2, 3, 8, 8)
    down = layers.Resample(3, down=True, resample_filter=(1, 1))
    up = layers.Resample(3, up=True, resample_filter=(1, 1))
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2))
    torch.testing.assert_close(up(x), F.interpolate(x, scale_factor=2, mode="nearest"))
    const = torch.full((1, 1, 8, 8), 2.0)  # a normalised [1,3,3,1] keeps constants away from the border
    torch.testing.assert_close(layers.Resample(1, down=True, resample_filter=(1, 3, 3, 1))(const)[..., 1:-1, 1:-1],
                               torch.full((1, 1, 2, 2), 2.0))
    torch.testing.assert_close(layers.Resample(1, up=True, resample_filter=(1, 3, 3, 1))(const)[..., 2:-2, 2:-2],
                               torch.full((1, 1, 12, 12), 2.0))
    assert "resample_filter" not in down.state_dict()  # derived from the config, not saved


@pytest.mark.parametrize("arch", ARCHS)
def test_class_conditioning(arch):
    net = perturb_(tiny(arch, label_dim=3, dropout=0.0)).eval()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([0.5, 0.5])
    a = net(x, t, class_labels=torch.eye(3)[[0, 0]]).sample
    b = net(x, t, class_labels=torch.eye(3)[[1, 2]]).sample
    assert not torch.allclose(a, b)
    none = net(x, t).sample
    assert torch.equal(none, net(x, t, class_labels=torch.zeros(2, 3)).sample)
    net.train()
    net.register_to_config(label_dropout=1.0)  # every label dropped -> the "no label" output
    assert torch.equal(net(x, t, class_labels=torch.eye(3)[[1, 2]]).sample, none)
    with pytest.raises(ValueError, match="class_labels must have shape"):
        net(x, t, class_labels=torch.zeros(2, 2))


def test_scalar_conditioning_and_bad_inputs():
    net = perturb_(tiny("ddpmpp", label_dim=1)).eval()
    x, t, ef = torch.randn(2, 1, 16, 16), torch.tensor([0.5, 0.5]), torch.tensor([0.55, 0.70])
    assert torch.equal(net(x, t, class_labels=ef).sample, net(x, t, class_labels=ef[:, None]).sample)
    plain = tiny("ddpmpp")
    with pytest.raises(ValueError, match="label_dim=0"):
        plain(x, t, class_labels=ef[:, None])
    with pytest.raises(ValueError, match="timestep"):
        plain(x, torch.zeros(3))
    with pytest.raises(ValueError, match="sample must have shape"):
        plain(torch.randn(2, 3, 16, 16), t)


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_autocast_forward_backward_is_finite(arch):
    net = perturb_(tiny(arch)).train()
    x = torch.randn(4, 1, 16, 16) * 3
    t = torch.tensor([-3.0, -0.5, 0.5, 3.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t).sample
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert torch.isfinite(out.float()).all()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert len(grads) == len(list(net.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_gives_same_gradients(arch):
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([0.3, -0.8])

    def grads(checkpointing):
        net = perturb_(tiny(arch, dropout=0.2)).train()
        calls = []
        if checkpointing:
            def counting_checkpoint(module, *args):
                calls.append(module)
                return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)
            net.enable_gradient_checkpointing(counting_checkpoint)
        torch.manual_seed(123)  # same dropout masks; checkpoint replays the RNG state on recompute
        net(x, t).sample.square().sum().backward()
        return {n: p.grad.clone() for n, p in net.named_parameters()}, calls

    plain, no_calls = grads(False)
    ckpt, calls = grads(True)
    assert not no_calls and len(calls) > 4
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_is_bitwise(arch, tmp_path):
    net = perturb_(tiny(arch, channels=3)).eval()
    net.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = type(net).from_pretrained(tmp_path).eval()
    def as_lists(config):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}
    assert as_lists(loaded.config) == as_lists(net.config)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.1, 2.0])
    assert torch.equal(loaded(x, t).sample, net(x, t).sample)
    if arch == "ncsnpp":
        assert torch.equal(loaded.map_noise.freqs, net.map_noise.freqs)


def test_build_network_validation():
    with pytest.raises(ValueError, match="arch must be one of"):
        build_network("unet")
    with pytest.raises(ValueError, match="unknown config field"):
        build_network("adm", num_res_blocks=2)
    with pytest.raises(ValueError, match="resolution="):
        build_network("adm", sample_size=32)
    with pytest.raises(ValueError, match="embedding_type"):
        build_network("ddpmpp", embedding_type="sinusoidal", **tiny_config("ddpmpp"))
    with pytest.raises(ValueError, match="channels_per_head"):
        build_network("adm", **{**tiny_config("adm"), "channels_per_head": 5})
    net = build_network("ncsnpp", channels=3, dropout=0.1, **tiny_config("ncsnpp", 32))
    assert (net.config.sample_size, net.config.in_channels, net.config.out_channels) == (32, 3, 3)
    assert net.config.dropout == 0.1 and net.config.encoder_type == "residual"
    for arch in ARCHS:
        assert 5_000 <= sum(p.numel() for p in tiny(arch).parameters()) <= 100_000


@pytest.mark.parametrize("arch", ARCHS)
def test_layerwise_casting_stores_every_conv_and_linear_weight_in_low_precision(arch):
    """diffusers' enable_layerwise_casting casts torch.nn conv / linear layers: all of ours are such layers."""
    net = perturb_(tiny(arch)).eval().to(torch.bfloat16)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([0.1, 2.0])
    expected = net(x.to(torch.bfloat16), t).sample.float()
    net.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    weights = {name: m.weight for name, m in net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    convs = [m for m in net.modules() if type(m).__name__ in ("Conv2d", "Linear")]
    assert len(weights) == len(convs) > 10  # every conv / linear of the network is a torch.nn one
    assert {w.dtype for w in weights.values()} == {torch.float8_e4m3fn}
    assert net.dtype == net.compute_dtype == torch.bfloat16  # the compute dtype, which the forward casts its input to
    out = net(x, t).sample.float()
    assert torch.isfinite(out).all() and not torch.equal(out, expected)  # fp8 weights: close, not equal
    torch.testing.assert_close(out, expected, rtol=0.2, atol=0.1 * expected.abs().max().item())
