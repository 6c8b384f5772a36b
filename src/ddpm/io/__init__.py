"""The io layer: every file is written once, atomically; images, checkpoints, weights files, data
sets, progress bars and the processes of torchrun (docs/LAYERS.md)."""
