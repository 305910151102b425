"""EchoDiffPipeline: per-seed sampling, output types, save/load (own classes and remote code), the API doc."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import EDMDPMSolverMultistepScheduler
from diffusers.utils import dynamic_modules_utils

from pipelines.components.pipeline_echodiff import EchoDiffPipeline, foreign_imports, relative_imports
from pipelines.components.scheduling_edm_heun import EDMHeunScheduler
from pipelines.networks import build_network, tiny_config
from pipelines.utils import to_uint8

REPO = Path(__file__).resolve().parent.parent
STEPS = 6  # 11 network evaluations: enough to exercise every branch of the sampler
CHURN = dict(s_churn=10.0, s_min=0.05, s_max=50.0, s_noise=1.003)


def tiny_network(arch="ddpmpp", label_dim=0):
    """A tiny network with visibly non-zero output (fresh EDM networks start with near-zero output layers)."""
    with torch.random.fork_rng():  # the same weights every time, without touching the global RNG
        torch.manual_seed(0)
        net = build_network(arch, label_dim=label_dim, **tiny_config(arch))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return net.eval()


def make_pipeline(arch="ddpmpp", **scheduler_config):
    pipe = EchoDiffPipeline(unet=tiny_network(arch), scheduler=EDMHeunScheduler(**scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return make_pipeline(**CHURN)


def latents(pipeline, seeds, **kwargs):
    return pipeline(seeds=seeds, num_inference_steps=STEPS, output_type="latent", **kwargs).images


def test_image_of_a_seed_does_not_depend_on_the_batch(pipe):
    batch = latents(pipe, [5, 9, 13, 21])
    assert batch.shape == (4, 1, 16, 16) and batch.dtype == torch.float32
    assert torch.isfinite(batch).all() and batch.std() > 0.1
    alone = latents(pipe, [13])
    pair = latents(pipe, [21, 5])
    # Equal up to float rounding: CPU convolutions may sum in a batch-size dependent order.
    torch.testing.assert_close(alone[0], batch[2], rtol=0, atol=1e-4)
    torch.testing.assert_close(pair, batch[[3, 0]], rtol=0, atol=1e-4)
    assert not torch.allclose(batch[0], batch[1])


def test_output_types_follow_diffusers(pipe):
    raw = latents(pipe, [1, 2])
    expected = (raw / 2 + 0.5).clamp(0, 1)  # diffusers' [-1, 1] -> [0, 1]
    as_pt = pipe(seeds=[1, 2], num_inference_steps=STEPS, output_type="pt").images
    as_np = pipe(seeds=[1, 2], num_inference_steps=STEPS, output_type="np").images
    as_pil = pipe(seeds=[1, 2], num_inference_steps=STEPS).images
    assert as_pt.dtype == torch.float32 and as_pt.shape == (2, 1, 16, 16)
    torch.testing.assert_close(as_pt, expected, rtol=0, atol=1e-7)
    assert as_np.dtype == np.float32 and as_np.shape == (2, 16, 16, 1)
    np.testing.assert_allclose(as_np, expected.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-7)
    assert [image.mode for image in as_pil] == ["L", "L"] and as_pil[0].size == (16, 16)
    np.testing.assert_array_equal(np.asarray(as_pil[1]), (as_np[1, ..., 0] * 255).round().astype(np.uint8))
    (tuple_images,) = pipe(seeds=[1, 2], num_inference_steps=STEPS, output_type="pt", return_dict=False)
    torch.testing.assert_close(tuple_images, expected, rtol=0, atol=1e-7)
    # FID keeps EDM's own writer on the raw samples: (x * 127.5 + 128) clipped and truncated.
    assert torch.equal(to_uint8(raw), (raw * 127.5 + 128).clamp(0, 255).floor().to(torch.uint8))


def test_generator_and_batch_size_paths(pipe):
    one = pipe(batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
               output_type="latent").images
    again = pipe(batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                 output_type="latent").images
    assert one.shape == (2, 1, 16, 16) and torch.equal(one, again)
    listed = pipe(num_inference_steps=STEPS, generator=[torch.Generator().manual_seed(s) for s in (4, 8)],
                  output_type="latent").images
    torch.testing.assert_close(listed, latents(pipe, [4, 8]), rtol=0, atol=0)


def test_network_evaluations_and_eval_mode(pipe):
    calls = []
    handle = pipe.unet.register_forward_hook(lambda module, args, output: calls.append(module.training))
    try:
        pipe.unet.train()
        trained_mode = latents(pipe, [3])
        assert pipe.unet.training  # restored after the call
        pipe.unet.eval()
        eval_mode = latents(pipe, [3])
    finally:
        handle.remove()
        pipe.unet.eval()
    assert len(calls) == 2 * (2 * STEPS - 1) and not any(calls)  # Heun: 2N - 1 evaluations, never in training mode
    assert torch.equal(trained_mode, eval_mode)


def test_per_call_sampler_overrides_leave_the_saved_config_alone(pipe):
    deterministic = latents(pipe, [7], s_churn=0.0)
    churned = latents(pipe, [7])
    euler = latents(pipe, [7], s_churn=0.0, solver="euler")
    assert pipe.scheduler.config.s_churn == CHURN["s_churn"] and pipe.scheduler.config.solver == "heun"
    assert not torch.allclose(deterministic, churned) and not torch.allclose(deterministic, euler)
    torch.testing.assert_close(latents(make_pipeline(), [7]), deterministic, rtol=0, atol=0)


def test_callback_on_step_end_sees_every_evaluation_and_can_replace_the_sample(pipe):
    seen = []

    def record(pipeline, i, t, tensors):
        seen.append((i, float(t), sorted(tensors)))
        return {}

    plain = latents(pipe, [2], s_churn=1.0)
    out = latents(pipe, [2], s_churn=1.0, callback_on_step_end=record,
                  callback_on_step_end_tensor_inputs=["latents", "denoised"])
    torch.testing.assert_close(out, plain, rtol=0, atol=0)  # a callback that returns nothing changes nothing
    per_call = EDMHeunScheduler.from_config(pipe.scheduler.config, s_churn=1.0)  # the per-call sampler's grid
    per_call.set_timesteps(STEPS)
    assert [i for i, _, _ in seen] == list(range(2 * STEPS - 1)) and pipe.num_timesteps == 2 * STEPS - 1
    assert [t for _, t, _ in seen] == per_call.timesteps.tolist()
    assert all(names == ["denoised", "latents"] for _, _, names in seen)

    def zero_at_the_end(pipeline, i, t, tensors):
        return {"latents": torch.zeros_like(tensors["latents"])} if i == pipeline.num_timesteps - 1 else {}

    assert torch.equal(latents(pipe, [2], callback_on_step_end=zero_at_the_end), torch.zeros(1, 1, 16, 16))


def test_latents_and_num_images_per_prompt(pipe):
    deterministic = make_pipeline()  # no churn: the starting noise alone decides the image
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    from_latents = deterministic(latents=noise, num_inference_steps=STEPS, output_type="latent").images
    from_seed = latents(deterministic, [5])
    torch.testing.assert_close(from_latents[:1], from_seed, rtol=0, atol=1e-5)
    assert from_latents.shape == (2, 1, 16, 16) and not torch.allclose(from_latents[0], from_latents[1])
    many = pipe(batch_size=2, num_images_per_prompt=3, num_inference_steps=STEPS, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images
    assert many.shape == (6, 1, 16, 16)
    conditional = EchoDiffPipeline(unet=tiny_network(label_dim=3), scheduler=EDMHeunScheduler())
    conditional.set_progress_bar_config(disable=True)
    labels = torch.eye(3)[[0, 2]]
    per_prompt = conditional(seeds=[1, 2, 3, 4], class_labels=labels, num_images_per_prompt=2,
                             num_inference_steps=STEPS, output_type="latent").images
    repeated = conditional(seeds=[1, 2, 3, 4], class_labels=labels[[0, 0, 1, 1]], num_inference_steps=STEPS,
                           output_type="latent").images
    assert torch.equal(per_prompt, repeated) and not torch.allclose(per_prompt[1], per_prompt[2], atol=1e-3)


def test_bad_calls_are_named(pipe):
    with pytest.raises(ValueError, match="seeds"):
        pipe(seeds=[1], generator=torch.Generator())
    with pytest.raises(ValueError, match="batch_size"):
        pipe(batch_size=3, seeds=[1, 2])
    with pytest.raises(ValueError, match="output_type"):
        pipe(seeds=[1], output_type="jpeg")
    with pytest.raises(TypeError, match="s_chrun"):
        pipe(seeds=[1], s_chrun=3)
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        pipe(seeds=[1], num_images_per_prompt=0)
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe(latents=torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(seeds=[1], callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise"])
    conditional = EchoDiffPipeline(unet=tiny_network(label_dim=3), scheduler=EDMHeunScheduler())
    conditional.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="class_labels"):
        conditional(seeds=[1], num_inference_steps=2)
    labels = torch.eye(3)[[0, 2]]
    out = conditional(seeds=[1, 2], class_labels=labels, num_inference_steps=2, output_type="latent").images
    assert out.shape == (2, 1, 16, 16)


@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp", "adm", "edm2-xs"])
def test_save_and_load_through_diffusers_loader_is_bitwise_equal(arch, tmp_path):
    pipeline = make_pipeline(arch, preconditioning="vp", **CHURN)
    expected = latents(pipeline, [0, 1])
    pipeline.save_pretrained(tmp_path)
    module = {"adm": "unet_adm", "edm2-xs": "unet_edm2"}.get(arch, "unet_song")
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_echodiff", "EchoDiffPipeline"]
    assert index["unet"] == [module, type(pipeline.unet).__name__]
    assert index["scheduler"] == ["scheduling_edm_heun", "EDMHeunScheduler"]
    carried = {"pipeline_echodiff.py", "conditioning.py", "guidance.py", "samplers.py", "preconditioning.py", "scheduling_edm_heun.py",
               f"unet/{module}.py", "unet/layers.py",
               "scheduler/scheduling_edm_heun.py", "scheduler/preconditioning.py"}
    assert carried == {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.py")}
    for name in carried:  # the files are EchoDiff's own, as they are
        assert (tmp_path / name).read_text() == (REPO / "pipelines/components" / Path(name).name).read_text()

    with pytest.raises(ValueError, match="trust_remote_code"):  # a folder's code never runs unasked
        EchoDiffPipeline.from_pretrained(tmp_path)
    loaded = EchoDiffPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.unet).__name__ == type(pipeline.unet).__name__ and loaded.discriminator is None
    assert loaded.scheduler.preconditioning.kind == "vp"
    assert torch.equal(latents(loaded, [0, 1]), expected)


def test_diffusers_loader_options_dtype_variant_device_map(pipe, tmp_path):
    expected = latents(pipe, [0, 1])
    pipe.save_pretrained(tmp_path / "fp32")
    for options in ({"dtype": torch.bfloat16}, {"dtype": {"unet": torch.bfloat16, "default": torch.float32}}):
        loaded = EchoDiffPipeline.from_pretrained(tmp_path / "fp32", trust_remote_code=True, **options)
        loaded.set_progress_bar_config(disable=True)
        assert loaded.unet.dtype == torch.bfloat16
        out = latents(loaded, [0, 1])
        assert out.dtype == torch.float32 and not torch.equal(out, expected)  # bf16 weights: close, not equal
        torch.testing.assert_close(out, expected, rtol=0, atol=0.1)
    loaded = EchoDiffPipeline.from_pretrained(tmp_path / "fp32", trust_remote_code=True, device_map="cpu")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.unet.device.type == "cpu" and torch.equal(latents(loaded, [0, 1]), expected)

    half = EchoDiffPipeline(unet=tiny_network().to(torch.float16), scheduler=pipe.scheduler)
    half.save_pretrained(tmp_path / "variant", variant="fp16")
    assert (tmp_path / "variant" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = EchoDiffPipeline.from_pretrained(tmp_path / "variant", trust_remote_code=True, variant="fp16",
                                              dtype=torch.float16)
    for name, weight in half.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[name], weight), name


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from diffusers import DiffusionPipeline

    folder, resaved, out_file, threads, variant_folder, swapped_folder = sys.argv[1:4] + [int(sys.argv[4])] + sys.argv[5:7]
    torch.set_num_threads(threads)
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert not any(name == "pipelines" or name.startswith("pipelines.") for name in sys.modules), "EchoDiff imported"
    for component in (pipe, pipe.unet, pipe.scheduler):
        assert type(component).__module__.startswith("diffusers_modules."), type(component)
    pipe.set_progress_bar_config(disable=True)
    first = pipe(seeds=[0, 1], num_inference_steps=STEPS, output_type="latent").images
    pipe.save_pretrained(resaved)
    again = DiffusionPipeline.from_pretrained(resaved, trust_remote_code=True)
    again.set_progress_bar_config(disable=True)
    second = again(seeds=[0, 1], num_inference_steps=STEPS, output_type="latent").images
    # diffusers' loader options work on remote code too
    options = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, device_map="cpu",
                                                dtype={"unet": torch.bfloat16, "default": torch.float32})
    assert options.unet.dtype == torch.bfloat16 and options.unet.device.type == "cpu"
    half = DiffusionPipeline.from_pretrained(variant_folder, trust_remote_code=True, variant="fp16", dtype=torch.float16)
    # a VE pipeline whose scheduler was swapped for diffusers' DPM-Solver++(3M), and a named sampler
    swapped = DiffusionPipeline.from_pretrained(swapped_folder, trust_remote_code=True)
    swapped.set_progress_bar_config(disable=True)
    assert type(swapped.scheduler).__name__ == "EDMDPMSolverMultistepScheduler"
    assert swapped.preconditioning.kind == "ve"
    assert pipe(seeds=[0], num_inference_steps=2).sampler == "heun"  # named by class name in remote code too
    dpm = swapped(seeds=[0, 1], num_inference_steps=STEPS, output_type="latent").images
    unipc = swapped(seeds=[0, 1], num_inference_steps=STEPS, output_type="latent", sampler="unipc").images
    torch.save({"first": first, "second": second, "half_weights": half.unet.state_dict(), "dpm": dpm,
                "unipc": unipc}, out_file)
    """
).replace("STEPS", str(STEPS))


def test_remote_code_load_in_a_fresh_process_is_bitwise_equal(pipe, tmp_path):
    expected = latents(pipe, [0, 1])
    folder, resaved, out_file = tmp_path / "saved", tmp_path / "resaved", tmp_path / "out.pt"
    pipe.save_pretrained(folder)
    half = EchoDiffPipeline(unet=tiny_network().to(torch.float16), scheduler=pipe.scheduler)
    half.save_pretrained(tmp_path / "variant", variant="fp16")
    swapped = make_pipeline(preconditioning="ve")
    swapped.scheduler = EDMDPMSolverMultistepScheduler(solver_order=3)
    swapped.save_pretrained(tmp_path / "swapped")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(folder), str(resaved), str(out_file), str(torch.get_num_threads()),
         str(tmp_path / "variant"), str(tmp_path / "swapped")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = torch.load(out_file, weights_only=True)
    assert torch.equal(outputs["first"], expected)
    assert torch.equal(outputs["second"], expected)
    assert all(torch.equal(outputs["half_weights"][k], v) for k, v in half.unet.state_dict().items())
    assert torch.equal(outputs["dpm"], latents(swapped, [0, 1]))
    assert torch.equal(outputs["unipc"], latents(swapped, [0, 1], sampler="unipc"))
    resaved_index = json.loads((resaved / "model_index.json").read_text())
    assert resaved_index["unet"] == ["unet_song", "SongUNet2DModel"]
    assert {p.relative_to(resaved).as_posix() for p in resaved.rglob("*.py")} == \
        {p.relative_to(folder).as_posix() for p in folder.rglob("*.py")}


def test_components_folder_rule(tmp_path):
    """Nothing under components/ imports pipelines.*; siblings are imported relatively and directly (diffusers'
    remote-code loader copies one level of relative imports), and other imports are torch / diffusers / stdlib."""
    folder = REPO / "pipelines" / "components"
    files = sorted(p for p in folder.glob("*.py") if p.name != "__init__.py")
    assert {p.stem for p in files} >= {"pipeline_echodiff", "guidance", "preconditioning", "layers", "unet_song",
                                       "unet_adm", "unet_edm2", "discriminator", "scheduling_edm_heun", "scheduling_edm_ablation"}
    for path in files:
        assert foreign_imports(path) == [], path.name
        direct = set(relative_imports(path))
        assert all(sibling.is_file() for sibling in direct), path.name
        closure, todo = set(), list(direct)
        while todo:
            sibling = todo.pop()
            if sibling not in closure:
                closure.add(sibling)
                todo += relative_imports(sibling)
        assert closure == direct, f"{path.name} must import {sorted(p.name for p in closure - direct)} directly"
    bad = tmp_path / "bad_component.py"
    bad.write_text("import math\nimport torch\nfrom pipelines.utils import to_uint8\nfrom .helpers import x\n"
                   "import pipelines.hub as hub\nimport os, evil\nfrom . import sibling\n")
    assert foreign_imports(bad) == [".", "evil", "pipelines.hub", "pipelines.utils"]
    assert relative_imports(bad) == [tmp_path / "helpers.py"]


@pytest.mark.parametrize("doc, min_blocks", [("docs/python_api.md", 3), ("README.md", 1)])
def test_python_api_doc_runs(tmp_path, monkeypatch, doc, min_blocks):
    text = (REPO / doc).read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) >= min_blocks
    monkeypatch.chdir(tmp_path)
    # Keep diffusers' copies of remote code out of the user's cache.
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    namespace = {}
    exec(compile("\n".join(blocks), doc, "exec"), namespace)  # noqa: S102 - our own doc
    assert len(namespace["images"]) == 4 and (tmp_path / "echodiff-tiny" / "pipeline_echodiff.py").is_file()
    if doc == "docs/python_api.md":
        assert namespace["loss"].shape == (8, 1, 16, 16)
