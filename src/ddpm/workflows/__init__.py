"""The workflows layer: what the commands do, each as a library call: train, sample, bits/dim, the
paper's experiments, FID and evaluation, the demo (docs/LAYERS.md)."""
