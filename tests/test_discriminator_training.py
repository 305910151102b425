"""Discriminator training loop (resume, accuracy), its checkpoints and epoch selection, and train_discriminator.py."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.components.discriminator import EchoDiffDiscriminator
from pipelines.training.checkpoints import load_optimizer_state, save_optimizer_state
from pipelines.training.discriminator import (
    DiscriminatorTrainingConfig,
    SigmaDistribution,
    load_epoch_discriminator,
    make_real_fake_split,
    saved_epochs,
    select_best_epoch,
    sigma_buckets,
    train_discriminator,
)

TINY = dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), head_channels=8)


def tiny_disc(**kw):
    torch.manual_seed(0)
    return EchoDiffDiscriminator(sample_size=16, in_channels=1, **{**TINY, **kw})


# ------------------------------------------------------------------ training
def test_sigma_distributions_cover_the_requested_range():
    g = torch.Generator().manual_seed(0)
    s = SigmaDistribution("log-uniform", 0.002, 80.0).sample(20000, g).double()
    assert s.min() >= 0.002 and s.max() <= 80.0
    assert s.log().mean().item() == pytest.approx((math.log(0.002) + math.log(80)) / 2, abs=0.05)
    assert s.log().std().item() == pytest.approx((math.log(80) - math.log(0.002)) / math.sqrt(12), rel=0.02)
    s = SigmaDistribution("log-normal", p_mean=-1.2, p_std=1.2).sample(20000, g).double()
    assert s.log().mean().item() == pytest.approx(-1.2, abs=0.03)
    assert s.log().std().item() == pytest.approx(1.2, rel=0.02)
    with pytest.raises(ValueError, match="sigma distribution"):
        SigmaDistribution("uniform")
    edges, centres = sigma_buckets(0.002, 80, 4)
    assert edges[0] == pytest.approx(0.002) and edges[-1] == pytest.approx(80)
    assert np.allclose(np.diff(np.log(edges)), np.log(40000) / 4)


def synthetic_real_fake(n=384, seed=0):
    """Real: smooth blobs; generated: the same blobs with a +-checkerboard texture (a 'model artefact')."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:16, :16]

    def blobs(k):
        cx, cy = rng.uniform(4, 12, (2, k, 1, 1))
        img = 60 + 120 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 18.0)
        return img

    real = blobs(n)
    fake = blobs(n) + 40 * (((xx + yy) % 2) * 2 - 1)
    to_u8 = lambda a: np.clip(a, 0, 255).astype(np.uint8)[:, None]  # noqa: E731
    return to_u8(real), to_u8(fake)


def test_make_real_fake_split_is_stratified_balanced_and_checked():
    real, fake = synthetic_real_fake(100)
    split = make_real_fake_split(real, fake[:60], val_fraction=0.2, seed=1)
    assert len(split.images) == 120 and split.labels.sum() == 60  # balanced to the smaller side
    assert len(np.intersect1d(split.train_indices, split.val_indices)) == 0
    assert split.labels[split.val_indices].sum() == 12 and len(split.val_indices) == 24
    with pytest.raises(ValueError, match="generated images"):
        make_real_fake_split(real, fake.astype(np.float32))
    with pytest.raises(ValueError, match="differ in shape"):
        make_real_fake_split(real, fake[:, :, :8])


def test_trained_tiny_discriminator_beats_chance_and_resume_is_exact(tmp_path):
    real, fake = synthetic_real_fake(384)
    data = make_real_fake_split(real, fake, val_fraction=0.25, seed=0)
    cfg = DiscriminatorTrainingConfig(num_epochs=4, batch_size=32, learning_rate=2e-3, num_val_buckets=4,
                                      sigma=SigmaDistribution("log-uniform", 0.002, 80.0), log_every=5)

    full = tiny_disc()
    history = train_discriminator(full, data, tmp_path / "full", cfg, progress=False)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert saved_epochs(tmp_path / "full") == [1, 2, 3, 4]
    last = history[-1]
    low_sigma = [k for k in last if k.startswith("val/accuracy_sigma_")][0]  # smallest-sigma bucket first
    high_sigma = [k for k in last if k.startswith("val/accuracy_sigma_")][-1]
    assert last[low_sigma] > 0.9, last  # the texture is easy to see at low noise
    assert abs(last[high_sigma] - 0.5) < 0.15, last  # at sigma ~ 30 it is drowned: chance
    assert last["val/accuracy"] > 0.6
    # history and tensorboard logs on disk
    assert json.loads((tmp_path / "full" / "history.json").read_text())[-1]["epoch"] == 4
    assert any((tmp_path / "full" / "logs").rglob("events.out.tfevents*"))
    # only the newest epoch keeps optimizer state
    assert (tmp_path / "full" / "checkpoints" / "epoch-004" / "optimizer.safetensors").is_file()
    assert not (tmp_path / "full" / "checkpoints" / "epoch-003" / "optimizer.safetensors").is_file()

    # interrupted after 2 epochs, then the same command again: same weights as the straight run
    part = tiny_disc()
    train_discriminator(part, data, tmp_path / "part", DiscriminatorTrainingConfig(**{**cfg.__dict__,
                                                                                    "num_epochs": 2}),
                        progress=False)
    resumed = tiny_disc()
    history2 = train_discriminator(resumed, data, tmp_path / "part", cfg, progress=False)
    assert [h["epoch"] for h in history2] == [1, 2, 3, 4]
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    reloaded = load_epoch_discriminator(tmp_path / "part", 4)
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(reloaded(x, 0.3).logits, full.eval()(x, 0.3).logits, rtol=1e-6, atol=1e-7)


def test_optimizer_state_roundtrip_through_safetensors(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-7)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    save_optimizer_state(opt, tmp_path / "opt.safetensors")
    fresh = torch.optim.Adam(model.parameters(), lr=5.0)
    load_optimizer_state(fresh, tmp_path / "opt.safetensors")
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for key in a["state"][i]:
            assert torch.equal(torch.as_tensor(a["state"][i][key]), torch.as_tensor(b["state"][i][key]))


# ------------------------------------------------------------------ epoch selection
def _fake_checkpoints(root, epochs):
    for e in epochs:
        d = root / "checkpoints" / f"epoch-{e:03d}"
        (d / "discriminator").mkdir(parents=True)
        (d / "state.json").write_text(json.dumps({"epoch": e}))
    killed = root / "checkpoints" / ".tmp-epoch-009"  # a save killed before its rename is ignored
    (killed / "discriminator").mkdir(parents=True)
    (killed / "state.json").write_text(json.dumps({"epoch": 9}))


def test_select_best_epoch_picks_minimum_records_tables_and_resumes(tmp_path):
    _fake_checkpoints(tmp_path, [1, 2, 3, 4])
    fid = {1: 9.0, 2: 4.5, 3: 3.2, 4: 3.9}
    calls = []

    def score(epoch):
        calls.append(epoch)
        if len(calls) == 3:
            raise KeyboardInterrupt  # interrupted while scoring epoch 3
        return fid[epoch]

    with pytest.raises(KeyboardInterrupt):
        select_best_epoch(tmp_path, score, settings={"n": 10})
    saved = json.loads((tmp_path / "epoch_selection.json").read_text())
    assert [row["epoch"] for row in saved["table"]] == [1, 2]
    calls.clear()
    best, table = select_best_epoch(tmp_path, lambda e: calls.append(e) or fid[e], settings={"n": 10})
    assert calls == [3, 4]  # epochs 1 and 2 are not scored again
    assert best == 3 and [r["FID"] for r in table] == [9.0, 4.5, 3.2, 3.9]
    md = (tmp_path / "epoch_selection.md").read_text()
    assert "| 3 (best) | 3.2000 |" in md
    assert json.loads((tmp_path / "epoch_selection.json").read_text())["best_epoch"] == 3
    with pytest.raises(ValueError, match="other settings"):
        select_best_epoch(tmp_path, fid.get, settings={"n": 50})
    with pytest.raises(ValueError, match="no checkpoint"):
        select_best_epoch(tmp_path, fid.get, epochs=[7], settings={"n": 10})


# ------------------------------------------------------------------ train_discriminator.py end to end
class FakeHfApi:
    """Records the repo creation and the files of each uploaded folder (the Hub adds a bare name's namespace)."""

    def __init__(self):
        self.created, self.uploads = [], []

    def create_repo(self, repo_id, **kwargs):
        from huggingface_hub import RepoUrl

        self.created.append((repo_id, kwargs))
        return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'token-owner/' + repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = {p.relative_to(folder_path).as_posix(): p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()}
        self.uploads.append((repo_id, files, kwargs))
        return "fake-commit"


def test_train_discriminator_cli_trains_selects_by_fid_and_exports_a_dg_pipeline(tmp_path):
    import train_discriminator
    from pipelines.components.pipeline_echodiff import EchoDiffPipeline
    from pipelines.components.scheduling_edm_heun import EDMHeunScheduler
    from pipelines.data.frame_builder import build_frame_dataset
    from pipelines.data.synthetic_echonet import write_synthetic_echonet
    from pipelines.networks import build_network, tiny_config
    from pipelines.utils import reset_accelerate_state

    echonet = write_synthetic_echonet(tmp_path / "echonet", num_videos=6, seed=0, num_frames=(12, 14),
                                      num_workers=1)
    build_frame_dataset(echonet, tmp_path / "frames", resolution=16, frame_stride=4, num_workers=1,
                        progress=False, verbose=False)
    torch.manual_seed(0)
    EchoDiffPipeline(unet=build_network("adm", channels=1, **tiny_config("adm")),
                     scheduler=EDMHeunScheduler()).save_pretrained(tmp_path / "model")
    out = tmp_path / "dg"
    argv = ["--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "frames"), "--output_dir", str(out),
            "--generate_fake", "16", "--num_real", "16", "--steps", "3", "--tiny", "--epochs", "2",
            "--batch_size", "8", "--val_fraction", "0.25", "--val_buckets", "2", "--selection_seeds", "0-5",
            "--num_ref", "16", "--cache_dir", str(tmp_path / "cache"), "--no_progress_bar",
            "--push_to_hub", "--hub_model_id", "dg-tiny"]
    api = FakeHfApi()
    try:
        summary = train_discriminator.main(argv, hub_api=api)
    finally:
        reset_accelerate_state()
    assert saved_epochs(out) == [1, 2]
    selection = json.loads((out / "epoch_selection.json").read_text())
    fids = {row["epoch"]: row["FID"] for row in selection["table"]}
    assert set(fids) == {1, 2} and all(np.isfinite(v) and v > 0 for v in fids.values())
    assert selection["best_epoch"] == min(fids, key=fids.get) == summary["best_epoch"]
    assert selection["settings"]["dg_weight_first_order"] == 5.0  # the paper's DG settings by default
    assert len(list((out / "selection" / "epoch-001").glob("shard-*.npz"))) >= 1

    from pipelines.hub import load_pipeline

    pipe = load_pipeline(out / "pipeline")  # diffusers' loader; the folder carries its code
    assert type(pipe.discriminator).__name__ == "EchoDiffDiscriminator"  # the folder's own copy of the class
    best = load_epoch_discriminator(out, selection["best_epoch"])
    for a, b in zip(best.state_dict().values(), pipe.discriminator.state_dict().values()):
        assert torch.equal(a, b)
    settings = json.loads((out / "pipeline" / "dg_settings.json").read_text())
    guided = pipe(seeds=[0, 1], num_inference_steps=3, output_type="latent", **settings["sampler"]).images
    plain = pipe(seeds=[0, 1], num_inference_steps=3, output_type="latent").images
    assert guided.shape == (2, 1, 16, 16) and not torch.equal(guided, plain)

    # The exported folder carries a card (none before), and the push uploads it privately, named for the real repo.
    from huggingface_hub import ModelCard

    (repo_id, create_kwargs), = api.created
    assert repo_id == "dg-tiny" and create_kwargs["private"] is True
    (upload_repo, files, _), = api.uploads
    assert upload_repo == "token-owner/dg-tiny" and {"README.md", "samples.png", "dg_settings.json"} <= set(files)
    card = ModelCard(files["README.md"].decode())
    result, = card.data.eval_results
    assert result.metric_value == fids[selection["best_epoch"]] and result.dataset_type == "echodiff-synthetic-echonet"
    assert card.data.license == "unknown"  # synthetic training frames: not EchoNet-Dynamic's terms
    assert "over 6 generated" in card.text and f"epoch {selection['best_epoch']}" in card.text
    assert 'from_pretrained("token-owner/dg-tiny"' in card.text and "## Discriminator Guidance" in card.text
