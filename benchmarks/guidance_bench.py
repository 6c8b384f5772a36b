"""What classifier-free guidance costs: guided sampling against unconditional sampling at the same batch.

    python benchmarks/guidance_bench.py                  # the CPU table in BENCHMARKS.md
    python benchmarks/guidance_bench.py --device cuda    # the same on a GPU

For each network (the paper's CIFAR-10 U-Net, and the CPU demo's), in one process and one run:

- unconditional: `sample(...)` of the network with num_classes=0, batch B;
- conditional, w = 1: the same network with 10 classes, plain conditional sampling (one forward);
- guided, w = 3: ε(x, ∅) + 3 (ε(x, c) − ε(x, ∅)), the two predictions from one forward of 2B;
- the same three with diffusers' UNet2DModel holding the same weights (unet_to_diffusers), driven
  by the same loop and the same guidance code, side by side.

Each is S DDIM steps from the same per-image noise (`ddpm sample`'s path, with the device's fast
paths for our network as `ddpm sample --fast auto` uses them), repeated R times in turn (so drift
of a shared machine hits all of them alike); the table gives medians and the ratio to the
unconditional run of the same implementation. The target: guided / unconditional <= 2.1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import machine  # noqa: E402

from ddpm.network.fast import prepare_model  # noqa: E402
from ddpm.network.interop import unet_to_diffusers  # noqa: E402
from ddpm.network.unet import UNet  # noqa: E402
from ddpm.process.diffusion import GaussianDiffusion  # noqa: E402
from ddpm.run.config import RunConfig  # noqa: E402
from ddpm.process.sampling import SamplerSpec  # noqa: E402
from ddpm.workflows.sample import Images, sample  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
K = 10
W = 3.0
CASES = {"cpu": [("cifar10", 8), ("demo", 64)], "cuda": [("cifar10", 256), ("demo", 1024)]}


class DiffusersNet(torch.nn.Module):
    """diffusers' UNet2DModel as `net(x_t, t[, y])` with the paper's t (its timestep is t − 1)."""

    def __init__(self, net, num_classes: int):
        super().__init__()
        self.net, self.config = net, types.SimpleNamespace(num_classes=num_classes)

    def forward(self, x, t, y=None):
        return self.net(x, t - 1, class_labels=y).sample


def variants(preset: str, device: torch.device) -> dict:
    cfg = RunConfig.from_preset(preset).model.replace(dropout=0.0)
    torch.manual_seed(0)
    plain, cond = UNet.from_config(cfg).eval(), UNet.from_config(cfg.replace(num_classes=K)).eval()
    theirs_plain = DiffusersNet(unet_to_diffusers(plain).to(device).eval(), 0)
    theirs_cond = DiffusersNet(unet_to_diffusers(cond).to(device).eval(), K)
    ours_plain, ours_cond = prepare_model(plain, device), prepare_model(cond, device)
    return {("ddpm", "unconditional"): (ours_plain, None, 1.0), ("ddpm", "conditional, w = 1"): (ours_cond, "labels", 1.0),
            ("ddpm", f"guided, w = {W:g}"): (ours_cond, "labels", W),
            ("diffusers", "unconditional"): (theirs_plain, None, 1.0),
            ("diffusers", "conditional, w = 1"): (theirs_cond, "labels", 1.0),
            ("diffusers", f"guided, w = {W:g}"): (theirs_cond, "labels", W)}


def run_case(preset: str, batch: int, steps: int, reps: int, device: torch.device) -> list[dict]:
    cfg = RunConfig.from_preset(preset)
    shape = (cfg.model.in_channels, *cfg.model.size)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    labels = torch.arange(batch) % K
    vs = variants(preset, device)
    times: dict = {k: [] for k in vs}

    def go(model, lab, w):
        return sample(model, diffusion, shape, Images(0, range(batch), labels if lab else None, w), device=device,
                      sampler=SamplerSpec("ddim", steps=steps))

    with torch.no_grad():
        for model, lab, w in vs.values():  # warm-up: fast-path builds, allocator, caches
            go(model, lab, w)
        for _ in range(reps):
            for k, (model, lab, w) in vs.items():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                go(model, lab, w)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[k].append((time.perf_counter() - t0) / steps)
    rows = []
    for (impl, what), ts in times.items():
        med = statistics.median(ts)
        base = statistics.median(times[(impl, "unconditional")])
        rows.append(dict(preset=preset, batch=batch, impl=impl, variant=what, step_s=med, vs_unconditional=med / base,
                         all_s=ts))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=5, help="DDIM steps per measurement")
    p.add_argument("--reps", type=int, default=5, help="measurements of each variant, taken in turn")
    args = p.parse_args()
    device = torch.device(args.device)
    rows = []
    for preset, batch in CASES[device.type]:
        rows += run_case(preset, batch, args.steps, args.reps, device)
        for r in rows[-6:]:
            print(json.dumps({k: v for k, v in r.items() if k != "all_s"}), file=sys.stderr)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"guidance-{device.type}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(dict(command=" ".join([Path(sys.executable).name] + sys.argv), machine=machine(device),
                                   rows=rows), indent=2))
    print(f"wrote {out}", file=sys.stderr)
    print("| network | batch B | implementation | sampling | time per step | vs unconditional |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['batch']} | {r['impl']} | {r['variant']} | {r['step_s'] * 1e3:,.0f} ms | "
              f"{r['vs_unconditional']:.2f}x |")


if __name__ == "__main__":
    main()
