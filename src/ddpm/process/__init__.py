"""The process layer: the paper's equations (schedules, the diffusion, the likelihood terms, the
data's scale). It imports no network code and does no I/O (docs/LAYERS.md)."""
