"""EDM EMA: half-life in images, ramp-up, several half-lives, persistence."""

import math

import pytest
import torch

from pipelines.ema import EDMEma, ema_beta


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.register_buffer("scale", torch.ones(2))
        self.register_buffer("counter", torch.zeros((), dtype=torch.long))  # not averaged


def set_weights(model, value):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
        model.scale.fill_(value)


def test_beta_closed_form():
    # No ramp-up: 0.5 ** (batch / half-life in images).
    assert ema_beta(512, 10**9, 500, None) == pytest.approx(0.5 ** (512 / 500_000), rel=1e-12)
    # Ramp-up: half-life capped at 5% of the 1000 images seen = 50 images.
    assert ema_beta(512, 1000, 500, 0.05) == pytest.approx(0.5 ** (512 / 50), rel=1e-12)
    # Nothing seen yet: the EMA becomes the weights.
    assert ema_beta(512, 0, 500, 0.05) == 0.0
    # Past the cap the ramp-up no longer matters.
    assert ema_beta(512, 10**8, 500, 0.05) == ema_beta(512, 10**8, 500, None)


def test_half_life_means_half_after_that_many_images():
    model = Tiny()
    set_weights(model, 0.0)
    ema = EDMEma(model, half_life_kimg=0.064, rampup_ratio=None)  # 64 images
    set_weights(model, 1.0)
    for step in range(8):  # 8 steps x 8 images = one half-life
        ema.update(model, batch_size=8, images_seen=10_000 + 8 * step)
    ema_model = ema.copy_to(Tiny())
    for p in list(ema_model.parameters()) + [ema_model.scale]:
        torch.testing.assert_close(p, torch.full_like(p, 0.5), rtol=0, atol=1e-6)


def test_independent_of_batch_split():
    a_model, b_model = Tiny(), Tiny()
    b_model.load_state_dict(a_model.state_dict())
    ema_a = EDMEma(a_model, half_life_kimg=0.1, rampup_ratio=None)
    ema_b = EDMEma(b_model, half_life_kimg=0.1, rampup_ratio=None)
    set_weights(a_model, 2.0)
    set_weights(b_model, 2.0)
    for i in range(4):
        ema_a.update(a_model, batch_size=8, images_seen=1000 + 8 * i)
    ema_b.update(b_model, batch_size=32, images_seen=1000)
    for x, y in zip(ema_a.shadows[0], ema_b.shadows[0]):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_matches_float64_reference_with_rampup_and_several_half_lives():
    torch.manual_seed(0)
    model = Tiny()
    half_lives = [0.005, 0.5]  # 5 images (capped by the ramp-up only early) and 500
    ema = EDMEma(model, half_life_kimg=half_lives, rampup_ratio=0.05)
    param = model.lin.weight
    refs = [param.detach().double().clone() for _ in half_lives]
    seen, batch = 0, 16
    for _ in range(30):
        with torch.no_grad():
            param.add_(torch.randn_like(param))
        ema.update(model, batch_size=batch, images_seen=seen)
        for ref, h in zip(refs, half_lives):
            half_life = min(h * 1000, 0.05 * seen)
            beta = 0.5 ** (batch / half_life) if half_life > 0 else 0.0
            ref.mul_(beta).add_(param.detach().double() * (1 - beta))
        seen += batch
    index = ema.names.index("lin.weight")
    for shadow, ref in zip(ema.shadows, refs):
        torch.testing.assert_close(shadow[index].double(), ref, rtol=1e-5, atol=1e-5)
    # The two half-lives really differ (a short one follows the weights more closely).
    assert not torch.allclose(ema.shadows[0][index], ema.shadows[1][index])


def test_first_update_copies_weights_and_integer_buffers_are_left_alone():
    model = Tiny()
    ema = EDMEma(model, half_life_kimg=500, rampup_ratio=0.05)
    set_weights(model, 3.0)
    ema.update(model, batch_size=512, images_seen=0)
    target = Tiny()
    target.counter.fill_(7)
    ema.copy_to(target)
    assert all(torch.equal(p, torch.full_like(p, 3.0)) for p in target.parameters())
    assert torch.equal(target.scale, torch.full((2,), 3.0))
    assert target.counter.item() == 7
    assert "counter" not in ema.names


def test_save_load_round_trip_and_mismatch(tmp_path):
    torch.manual_seed(1)
    model = Tiny()
    ema = EDMEma(model, half_life_kimg=[1.0, 2.0])
    with torch.no_grad():
        model.lin.weight.mul_(-3)
    ema.update(model, batch_size=4, images_seen=400)
    path = tmp_path / "ema.safetensors"
    ema.save(str(path))
    fresh = EDMEma(Tiny(), half_life_kimg=[1.0, 2.0])
    fresh.load(str(path))
    for a, b in zip(ema.shadows, fresh.shadows):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="ema_halflife_kimg"):
        EDMEma(Tiny(), half_life_kimg=[1.0]).load(str(path))


@pytest.mark.parametrize("bad", [0, -1.0, []])
def test_invalid_half_life(bad):
    with pytest.raises(ValueError, match="half_life_kimg"):
        EDMEma(Tiny(), half_life_kimg=bad)


def test_ema_beta_is_a_half_life():
    # beta^(H / batch) == 0.5 for any batch size.
    for batch in (1, 8, 512):
        beta = ema_beta(batch, 10**9, 500, None)
        assert math.isclose(beta ** (500_000 / batch), 0.5, rel_tol=1e-9)
