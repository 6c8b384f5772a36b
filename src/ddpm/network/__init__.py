"""The network layer: the paper's U-Net, the fast paths applied to it from outside, its weights
under other names (diffusers, the official TF code), and FID's Inception-v3 (docs/LAYERS.md)."""
