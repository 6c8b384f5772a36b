"""`ddpm export --to diffusers`: diffusers' own pipelines load the folder and, given the same noise,
draw what `ddpm sample` draws (another implementation of the same sampler, to 1e-4).

diffusers draws its noise through `randn_tensor` (the pipeline's x_T, then the scheduler's z at
every step but the last); the tests hand it ddpm's per-image draws in the same order.
"""

import json

import numpy as np
import pytest
import torch

from helpers import active
from ddpm.cli import main
from ddpm.errors import UserError
from ddpm.io.checkpoint import save_checkpoint
from ddpm.network.unet import UNet
from ddpm.run.config import RunConfig
from ddpm.run.load import load_run
from ddpm.workflows.export import export_run
from ddpm.process.sampling import SamplerSpec
from ddpm.workflows.sample import ImageNoise, Images, sample

diffusers = pytest.importorskip("diffusers", reason="the export is checked against diffusers (pip install diffusers)")
pytestmark = pytest.mark.usefixtures("one_thread")


def _checkpoint(root, **diffusion):
    """A checkpoint of the tiny network with trained-like weights (helpers.active) as its EMA."""
    run = RunConfig.from_preset("tiny")
    run = run.replace(model=run.model.replace(in_channels=1, out_channels=1),
                      diffusion=run.diffusion.replace(T=50, **diffusion))
    torch.manual_seed(0)
    net = active(UNet.from_config(run.model), seed=3)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    return save_checkpoint(root, 1, dict(step=1, model=sd, ema=sd, config=run.to_dict()))


def _feed(monkeypatch, noise):
    """diffusers' randn_tensor returns ddpm's per-image draws, in order."""
    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        return noise(torch.Size(shape)).to(dtype or torch.float32)

    import diffusers.pipelines.ddim.pipeline_ddim as ddim
    import diffusers.pipelines.ddpm.pipeline_ddpm as ddpm
    import diffusers.schedulers.scheduling_ddpm as sched
    for module in (ddpm, ddim, sched):
        monkeypatch.setattr(module, "randn_tensor", randn_tensor)


@pytest.mark.parametrize("diffusion", [dict(), dict(schedule="cosine", var_type="fixedsmall", mean_type="v")],
                         ids=["linear-fixedlarge-eps", "cosine-fixedsmall-v"])
def test_ddpm_pipeline_draws_what_ddpm_sample_draws(tmp_path, monkeypatch, diffusion):
    ckpt = _checkpoint(tmp_path / "run", **diffusion)
    out = tmp_path / "pipe"
    export_run(ckpt, out)
    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    loaded = load_run(ckpt)
    _feed(monkeypatch, ImageNoise(4, range(3), "cpu"))
    theirs = pipe(batch_size=3, num_inference_steps=50, output_type="np").images  # [0, 1], NHWC
    ours = sample(loaded.model, loaded.diffusion, loaded.shape, Images(4, range(3)), device="cpu")
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - 0.5).max() > 0.1  # real images, not a flat output
    diff = 2 * np.abs(theirs - ours).max()  # on the [-1, 1] scale
    print(f"DDPMPipeline vs ddpm sample ({diffusion or 'the paper'}): max |Δ| {diff:.2e} on [-1, 1]")
    assert diff <= 1e-4


def test_ddim_pipeline_draws_what_ddpm_ddim_draws(tmp_path, monkeypatch):
    ckpt = _checkpoint(tmp_path / "run")
    export_run(ckpt, tmp_path / "pipe")
    pipe = diffusers.DDIMPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    loaded = load_run(ckpt)
    _feed(monkeypatch, ImageNoise(1, range(2), "cpu"))
    # ddpm's DDIM recomputes ε̂ from the clipped x̂_0 (docs/MATH.md § Sampling): diffusers' option for that
    theirs = pipe(batch_size=2, num_inference_steps=10, eta=0.0, use_clipped_model_output=True, output_type="np").images
    ours = sample(loaded.model, loaded.diffusion, loaded.shape, Images(1, range(2)), device="cpu",
                  sampler=SamplerSpec("ddim", steps=10))  # uniform spacing: diffusers' "leading"
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert 2 * np.abs(theirs - ours).max() <= 1e-4


@pytest.mark.parametrize("sampler, cls", [("dpm++2m", "DPMSolverMultistepScheduler"),
                                          ("dpm++2m-sde", "DPMSolverMultistepScheduler")])
def test_a_few_step_export_draws_what_ddpm_draws(tmp_path, monkeypatch, sampler, cls):
    # The trailing grid is one diffusers' own set_timesteps makes too, so the pipeline runs unaided.
    ckpt = _checkpoint(tmp_path / "run")
    spec = SamplerSpec(sampler, steps=8, spacing="trailing")
    export_run(ckpt, tmp_path / "pipe", sampler=spec)
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "pipe")
    assert type(pipe.scheduler).__name__ == cls
    pipe.set_progress_bar_config(disable=True)
    loaded = load_run(ckpt)
    _feed(monkeypatch, ImageNoise(2, range(2), "cpu"))
    import diffusers.schedulers.scheduling_dpmsolver_multistep as dpm
    z = ImageNoise(7, range(2), "cpu")  # the SDE's noise, one draw a step, as ddpm's loop draws it
    monkeypatch.setattr(dpm, "randn_tensor", lambda shape, **kw: z(torch.Size(shape)))
    theirs = pipe(batch_size=2, num_inference_steps=8, output_type="np").images
    x_T = ImageNoise(2, range(2), "cpu")(torch.Size((2, *loaded.shape)))
    times, step = spec.chain(loaded.diffusion)
    ours = loaded.diffusion.reverse_loop(loaded.model, x_T, times, step, noise_fn=ImageNoise(7, range(2), "cpu"))
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - 0.5).max() > 0.1
    diff = 2 * np.abs(theirs - ours).max()
    print(f"{sampler}: DDPMPipeline with {cls} vs ddpm: max |Δ| {diff:.2e}")
    assert diff <= 1e-4


def test_what_a_diffusers_scheduler_cannot_sample_is_refused(tmp_path):
    ckpt = _checkpoint(tmp_path / "run")
    for spec, needle in ((SamplerSpec("heun", steps=9), "heun"), (SamplerSpec("dpm++2m", spacing="quad"), "trailing"),
                         (SamplerSpec("dpm++2m", spacing="uniform"), "logsnr"), (SamplerSpec("unipc"), "generator")):
        with pytest.raises(UserError, match=needle):
            export_run(ckpt, tmp_path / "pipe", sampler=spec)
        assert not (tmp_path / "pipe").exists()


def test_the_folder_is_a_run_for_ddpm_too(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "run")
    assert main(["export", str(ckpt), str(tmp_path / "pipe")]) == 0
    assert "DDPMPipeline.from_pretrained" in capsys.readouterr().out
    back, orig = load_run(tmp_path / "pipe"), load_run(ckpt)
    assert back.run.to_dict() == orig.run.to_dict()
    assert all(torch.equal(v, orig.model.state_dict()[k]) for k, v in back.model.state_dict().items())
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index["unet"] == ["diffusers", "UNet2DModel"]
    card = (tmp_path / "pipe" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers") and "T = 50" in card and "Not evaluated" in card
    # fine-tuning from the folder: the same weights in the model and the EMA
    run = RunConfig.from_preset("tiny", data="fashion-mnist-10k")
    from ddpm.workflows.train import train
    run = run.replace(train=run.train.replace(steps=1, init_from=str(tmp_path / "pipe"), lr=1e-12, warmup=0))
    train(tmp_path / "ft", run, progress=False)
    history = json.loads((tmp_path / "ft" / "config.json").read_text())["history"]
    assert history[0]["init_from"]["kind"] == "diffusers"
    with pytest.raises(UserError, match="--weights ema"):
        load_run(tmp_path / "pipe", weights="model")


def test_the_model_card_carries_the_evaluation(tmp_path):
    ckpt = _checkpoint(tmp_path / "run")
    sha = load_run(ckpt).sha256
    ev = tmp_path / "run" / "eval" / ckpt.stem
    ev.mkdir(parents=True)
    (ev / "eval.json").write_text(json.dumps(dict(checkpoint_sha256=sha, n_samples=50000, fid=dict(train=3.17, test=5.24),
                                                  inception_score=dict(is_mean=9.46, is_std=0.11),
                                                  bits_per_dim=dict(total_bpd=3.75))))
    export_run(ckpt, tmp_path / "pipe")
    card = (tmp_path / "pipe" / "README.md").read_text()
    assert "| FID against the train split | 3.170 |" in card and "9.460 ± 0.110" in card and "3.7500" in card


def test_push_to_hub_uploads_the_folder(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class Api:
        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private))

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", folder_path, repo_id))
            return type("Info", (), {"repo_url": f"https://huggingface.co/{repo_id}"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    res = export_run(_checkpoint(tmp_path / "run"), tmp_path / "pipe", push_to_hub="me/ddpm-tiny")
    assert calls == [("create", "me/ddpm-tiny", True), ("upload", str(tmp_path / "pipe"), "me/ddpm-tiny")]
    assert res["repo_url"] == "https://huggingface.co/me/ddpm-tiny"


def test_what_diffusers_cannot_hold_is_refused_before_writing(tmp_path):
    with pytest.raises(UserError, match="posterior mean"):
        export_run(_checkpoint(tmp_path / "a", mean_type="xprev"), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt"):
        export_run(_checkpoint(tmp_path / "b"), tmp_path / "mine")
