"""`ddpm export RUN --to diffusers OUT`: a trained run as a diffusers pipeline folder.

    OUT/model_index.json                   DDPMPipeline: unet + scheduler
    OUT/unet/config.json, diffusion_pytorch_model.safetensors    the U-Net (EMA weights by default)
    OUT/scheduler/scheduler_config.json    a DDPMScheduler that is Algorithm 2 with the run's process, or
                                           the diffusers scheduler of the chosen few-step sampler
    OUT/README.md                          the model card: training, data, evaluation, how to load
    OUT/ddpm_config.json                   the run's whole config, for `load_run` and `--init-from`

`DDPMPipeline.from_pretrained(OUT)` and `DDIMPipeline.from_pretrained(OUT)` load it; given the same
noise, diffusers' pipeline and `ddpm sample` draw the same images (tests/test_export.py). What the
scheduler config cannot say is in network/interop.py's `diffusers_scheduler_config`.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Optional

from ..config import parse_json
from ..errors import UserError
from ..files import read_text
from ..io.atomic import write_json, write_text
from ..io.escape import markdown_text
from ..io.folders import claim_folder
from ..io.weights import write_unet
from ..network.interop import diffusers_sampler_config
from ..network.unet import count_parameters
from ..process.sampling import Sampler, SamplerSpec
from ..run.load import PIPELINE_CONFIG, ModelSpec, describe_weights, load_run
from ..version import __version__
from .evaluate import read_eval_report

PIPELINE_FORMAT = "ddpm-diffusers-pipeline"


def export_run(run, out, *, to: str = "diffusers", weights: str = ModelSpec.weights, push_to_hub: Optional[str] = None,
               private: bool = True, sampler: SamplerSpec = SamplerSpec()) -> dict:
    """Write a trained run (a run directory or a checkpoint) as a diffusers pipeline folder `out`
    whose scheduler samples as `sampler` (`diffusers_sampler_config`), and upload it to the Hugging
    Face Hub as `push_to_hub` (a repo id) when given. -> dict(out, files, repo_url)."""
    if to != "diffusers":
        raise UserError(f"--to {to!r} is not valid; choose one of: diffusers")
    loaded = load_run(run, weights, "cpu", fast="off")
    # refuses what diffusers cannot hold, before writing
    sched, steps = diffusers_sampler_config(loaded.run.diffusion, sampler)
    # Ours only by ddpm's own record (or folder mark): a user's diffusers folder has a
    # model_index.json too, and is refused untouched.
    out = claim_folder(out, is_export, "a diffusers pipeline")
    files = write_unet(loaded.model, out / "unet", "diffusers")
    files.append(write_json(out / "scheduler" / "scheduler_config.json", sched))
    index = {"_class_name": "DDPMPipeline", "scheduler": ["diffusers", sched["_class_name"]],
             "unet": ["diffusers", "UNet2DModel"]}
    try:
        index["_diffusers_version"] = metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        pass
    files.append(write_json(out / "model_index.json", index))
    record = dict(format=PIPELINE_FORMAT, ddpm_version=__version__, config=loaded.run.to_dict(),
                  weights=loaded.weights, checkpoint=str(loaded.checkpoint), checkpoint_sha256=loaded.sha256,
                  classes=loaded.classes)
    files.append(write_json(out / PIPELINE_CONFIG, record))
    files.append(write_text(out / "README.md", model_card(loaded, _evaluation(loaded), sampler, steps)))
    repo_url = upload(out, push_to_hub, private) if push_to_hub else None
    return dict(out=str(out), files=[str(f) for f in files], repo_url=repo_url)


def is_export(folder: Path) -> bool:
    """Whether `folder` holds the record (ddpm_config.json) of an earlier `ddpm export`."""
    try:
        record = parse_json(read_text(Path(folder) / PIPELINE_CONFIG), PIPELINE_CONFIG)
    except (OSError, ValueError):  # UserError is a ValueError
        return False
    return isinstance(record, dict) and record.get("format") == PIPELINE_FORMAT


def _evaluation(loaded) -> Optional[dict]:
    """The `ddpm eval` report of this checkpoint, where the run holds one (RUN/eval/<ckpt>/eval.json)."""
    path = loaded.checkpoint.parent / "eval" / loaded.checkpoint.stem / "eval.json"
    if not path.is_file():
        return None
    rep = read_eval_report(path)
    return rep if rep.get("checkpoint_sha256") == loaded.sha256 else None


def model_card(loaded, evaluation: Optional[dict], sampler: SamplerSpec = SamplerSpec(),
               steps: Optional[int] = None) -> str:
    """README.md for the Hub: what the model is, how it was trained, how to load it, its numbers.
    Every string from the run's data, config or files is escaped (`markdown_text`): it shows as
    text, never as markup."""
    run, m = loaded.run, loaded.run.model
    K = m.num_classes
    h, w = m.size
    n_params = count_parameters(loaded.model)
    if sampler.sampler is Sampler.ANCESTRAL:
        use = ("from diffusers import DDPMPipeline\n\npipe = DDPMPipeline.from_pretrained(\"PATH_OR_REPO\")\n"
               f"images = pipe(batch_size=16).images            # Algorithm 2, {loaded.run.diffusion.T} steps\n"
               "# DDIM as ddpm samples it (ε̂ recomputed from the clipped x̂_0):\n"
               "# DDIMPipeline.from_pretrained(...)(num_inference_steps=50, use_clipped_model_output=True)")
    else:
        pipeline, extra = ("DDIMPipeline", f", eta={sampler.eta:g}, use_clipped_model_output=True") \
            if sampler.sampler is Sampler.DDIM else ("DDPMPipeline", "")
        use = (f"from diffusers import {pipeline}\n\npipe = {pipeline}.from_pretrained(\"PATH_OR_REPO\")\n"
               f"images = pipe(batch_size=16, num_inference_steps={steps}{extra}).images  # {sampler.sampler.value}, "
               f"{sampler.spacing} grid")
    if K:
        use = ("from diffusers import DDPMScheduler, UNet2DModel\n\nunet = UNet2DModel.from_pretrained(\"PATH_OR_REPO\", "
               "subfolder=\"unet\")\n# a class-conditional U-Net: call unet(x_t, t, class_labels=y), y in 0 … "
               f"{K - 1}, or {K} for no class;\n# DDPMPipeline passes no labels, so drive DDPMScheduler yourself, "
               "or use `ddpm sample --run PATH --class K --guidance W`")
    lines = ["---", "library_name: diffusers", "tags:", "- ddpm", "- diffusion",
             *(["pipeline_tag: unconditional-image-generation"] if not K else []), "---", "",
             f"# DDPM, {h}x{w}, {m.in_channels} channel{'s' if m.in_channels > 1 else ''}"
             f"{f', {K} classes' if K else ''}", "",
             f"A denoising diffusion probabilistic model (Ho, Jain & Abbeel 2020) trained with "
             f"[ddpm](https://pypi.org/project/ddpm/) {__version__}, exported with `ddpm export`. "
             f"The U-Net has {n_params:,} parameters; these are its "
             f"{describe_weights(loaded.weights)} weights.", "",
             "## Use", "", "```python", use, "```", "",
             "## Training", "",
             f"- data: {markdown_text(run.data.source)} (split {markdown_text(run.data.split)}, {h}x{w}, random flips "
             f"{'on' if run.data.random_flip else 'off'})",
             f"- process: T = {run.diffusion.T}, {run.diffusion.schedule.value} β from {run.diffusion.beta_start:g} "
             f"to {run.diffusion.beta_end:g}, predicting {run.diffusion.mean_type.value}, variance "
             f"{run.diffusion.var_type.value}, loss {run.diffusion.loss_type.value}",
             f"- recipe: {run.train.steps:,} steps of batch {run.train.batch_size}, Adam lr {run.train.lr:g} "
             f"(warm-up {run.train.warmup}), gradient clipping {run.train.grad_clip:g}, EMA decay "
             f"{run.train.ema_decay:g}" + (f", label dropout {run.train.label_dropout:g}" if K else ""),
             f"- checkpoint: {markdown_text(loaded.checkpoint.name)} (sha256 {loaded.sha256[:16]}…)", "",
             "The whole configuration is in `ddpm_config.json`.", "",
             "## Evaluation", ""]
    if evaluation:
        fid = evaluation.get("fid") or {}
        bpd = evaluation.get("bits_per_dim") or {}
        iscore = evaluation.get("inception_score") or {}
        kid, pr = evaluation.get("kid") or {}, evaluation.get("precision_recall") or {}
        lines += [f"`ddpm eval` of this checkpoint, {markdown_text(evaluation.get('n_samples'))} samples (Algorithm 2):",
                  "", "| metric | value |", "|---|---|",
                  *(f"| FID against the {markdown_text(split)} split | {v:.3f} |" for split, v in fid.items()
                    if v is not None),
                  *(f"| KID against the {markdown_text(split)} split | {v['kid_mean']:.5f} ± {v['kid_std']:.5f} |"
                    for split, v in kid.items() if v),
                  *(f"| precision / recall (k={v['k']}) against the {markdown_text(split)} split | "
                    f"{v['precision']:.3f} / {v['recall']:.3f} |" for split, v in pr.items() if v),
                  *([f"| Inception Score | {iscore['is_mean']:.3f} ± {iscore['is_std']:.3f} |"] if iscore else []),
                  *([f"| bits/dim (test, true bound) | {bpd['total_bpd']:.4f} |"] if bpd.get("total_bpd") else []),
                  ""]
    else:
        lines += ["Not evaluated: run `ddpm eval --run RUN_DIR` and export again to put FID, IS and bits/dim here.", ""]
    lines += ["## Differences from ddpm's own sampler", "",
              "- diffusers computes the schedule's tables in float32, ddpm in float64: samples agree to about 1e-5.",
              "- `ddpm sample` draws image i's noise from its own seed (seed, i); diffusers draws the batch from one "
              "generator, so the same seed gives other images.",
              "- The log-variance ddpm uses at t = 1 for the likelihood (log β̃_2 with fixedlarge) has no counterpart "
              "here; sampling adds no noise at the last step, so samples do not depend on it.", ""]
    return "\n".join(lines)


def upload(out: Path, repo_id: str, private: bool = True) -> str:
    """Upload the folder to the Hugging Face Hub (huggingface_hub, optional; the network is used only here)."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise UserError("--push-to-hub needs huggingface_hub: pip install huggingface_hub (and log in with "
                        "`huggingface-cli login` or HF_TOKEN)") from None
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(out), repo_id=repo_id, commit_message=f"ddpm export ({__version__})")
    return str(getattr(info, "repo_url", None) or f"https://huggingface.co/{repo_id}")
