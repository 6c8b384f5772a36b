"""Activation checkpointing, applied from outside the U-Net (as the fast paths are, network/fast.py).

    set_checkpointing(model, True)   # train.checkpointing=true

Each residual and attention block then keeps only its inputs during the forward pass and
recomputes its activations during the backward pass (torch.utils.checkpoint, non-reentrant):
memory for one more forward of each block. The numbers do not change: checkpoint saves the RNG
state when the block first runs and restores it for the recomputation (preserve_rng_state), so
the dropout masks replay identically and the gradients equal those without checkpointing.
Without gradients (sampling, evaluation) the blocks run as they are.

The blocks' `forward` is replaced on the instance, not the class, so the parameters, their names
and the state dict stay the network's own; a deep copy (the EMA) keeps the switch on its copy.
"""

from __future__ import annotations

import types

import torch
from torch.utils.checkpoint import checkpoint

from .unet import AttnBlock, ResBlock


def _checkpointed_forward(self, *args):
    if not torch.is_grad_enabled():
        return type(self).forward(self, *args)
    return checkpoint(type(self).forward, self, *args, use_reentrant=False)


def set_checkpointing(model: torch.nn.Module, on: bool) -> int:
    """Switch activation checkpointing of every ResBlock and AttnBlock on or off; returns their count."""
    n = 0
    for m in model.modules():
        if isinstance(m, (ResBlock, AttnBlock)):
            if on:
                m.forward = types.MethodType(_checkpointed_forward, m)
            else:
                m.__dict__.pop("forward", None)
            n += 1
    return n
