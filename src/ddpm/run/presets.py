"""The one preset table: a name gives a whole run (model, process, data, recipe).

Each preset is written as the sections of a config file that differ from the defaults (which
are the paper's CIFAR-10 choices), and `RunConfig.from_preset` builds it exactly as it would
build `--config FILE`. Every command that takes `--preset` (train, info) reads this table, so a
name means the same run everywhere. The values are the paper's Appendix B table
(docs/MATH.md § Training recipe) and the official release's configs; where neither says, the
comment gives our reading.
"""

from __future__ import annotations

# The paper's CIFAR-10 network (the official CIFAR-10 script's): 35,746,307 parameters.
_CIFAR10_NET = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, resolution=32)
# The official LSUN and CelebA-HQ scripts' `unet2d16b2c112244`: 113,673,219 parameters.
_NET_256 = dict(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0, resolution=256)
# The larger LSUN Bedroom model, "approximately 256 million parameters by increasing filter count"
# (Appendix B). Neither the paper nor the released code (whose LSUN script defines only the 114M model)
# gives its widths. Parameters grow as ch**2, and 114M * (192/128)**2 = 256M, so ch=192 with the
# same layout is our reading: 255,677,955 parameters. Not an official config.
_NET_256_LARGE = dict(_NET_256, ch=192)


def _run_256(net: dict, source: str, steps: int, random_flip: bool = True) -> dict:
    """The 256x256 recipe: Adam 2e-5, batch 64, fixedsmall; only the data and step counts differ."""
    return dict(model=net, diffusion=dict(var_type="fixedsmall"),
                data=dict(source=source, resolution=256, random_flip=random_flip),
                train=dict(batch_size=64, lr=2e-5, checkpoint_every=5000, sample_every=50_000, steps=steps))


PRESETS: dict[str, dict[str, dict]] = {
    "cifar10": dict(
        model=_CIFAR10_NET,
        diffusion=dict(var_type="fixedlarge"),
        data=dict(source="cifar10"),
        train=dict(steps=800_000, sample_every=10_000)),
    # The 256x256 data sets carry placeholder source names: give --data PATH. The paper trained
    # Bedroom without flips; the official script trained Cat without them.
    "celebahq256": _run_256(_NET_256, "celebahq", 500_000),
    "lsun_church256": _run_256(_NET_256, "lsun_church", 1_200_000),
    "lsun_bedroom256": _run_256(_NET_256, "lsun_bedroom", 2_400_000, random_flip=False),
    "lsun_bedroom256_large": _run_256(_NET_256_LARGE, "lsun_bedroom", 2_400_000, random_flip=False),
    "lsun_cat256": _run_256(_NET_256, "lsun_cat", 1_800_000, random_flip=False),
    # The CPU demo (`make demo`, about 5 minutes on 2 cores): a class-conditional model of the
    # embedded Fashion-MNIST subset at 16x16, so that each of the ten rows of its grid can be
    # judged. Measured on 2 cores (2026-12-01): 28x28 with T = 1000 needed ~1200 steps at 1.2 s each
    # and 16 minutes of guided sampling; at 16x16 a step costs 0.43 s and T = 100 (β from 1e-3 to
    # 0.2: the paper's 1e-4 … 0.02 scaled by 1000 / T, so that ᾱ_T is as small) makes Algorithm 2
    # ten times shorter, and 500 steps give recognisable rows. Three levels 16 -> 8 -> 4, width 32,
    # attention only in the middle; a shorter warm-up, a higher learning rate and a faster EMA
    # than the paper because the run is short (3.2 epochs of the 10k subset). Precision "auto": bf16
    # on a CPU that computes it natively (Zen 4: training steps 1.45x faster), fp32 elsewhere.
    "demo": dict(
        model=dict(in_channels=1, out_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(),
                   dropout=0.1, resolution=16, num_classes=10),
        diffusion=dict(var_type="fixedlarge", T=100, beta_start=1e-3, beta_end=0.2),
        data=dict(source="fashion-mnist-10k", resolution=16),
        train=dict(steps=500, batch_size=64, lr=2e-3, warmup=50, ema_decay=0.99, checkpoint_every=250,
                   milestone_every=0, log_every=25, device="cpu", precision="auto")),
    # For tests: a small model of the same architecture (attention at 16x16 still exercised) and a
    # handful of steps.
    "tiny": dict(
        model=dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0, resolution=32),
        diffusion=dict(),
        data=dict(source="fashion-mnist-10k", resolution=32),
        train=dict(steps=20, batch_size=8, lr=1e-3, warmup=5, ema_decay=0.9, checkpoint_every=5, milestone_every=0,
                   log_every=5, device="cpu")),
}

# Names an earlier version used for the network alone; they now name whole runs.
RENAMED = {"lsun256": "lsun_church256 (or lsun_bedroom256, lsun_cat256: the same network)",
           "lsun256_large": "lsun_bedroom256_large"}
