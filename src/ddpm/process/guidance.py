"""Class labels and classifier-free guidance (Ho & Salimans 2022), apart from any network.

    model = Guided(net, labels, weight=3.0, null_class=K)   # a callable model(x_t, t), as every
    x0 = diffusion.reverse_loop(model, x_T, times, step)      # sampler, the bound and the losses take

A class-conditional network is called `net(x_t, t, y)` with y ∈ {0 … K-1}, or K for "no class" (∅;
the network learned it from the labels that training dropped). `Guided` turns it, with the labels
of a batch, into the unconditional-looking `model(x_t, t)` that the diffusion's methods take, so
nothing in diffusion.py knows about classes. With guidance weight w (docs/MATH.md § Classes and
guidance):

    ε̃(x_t, t, c) = ε(x_t, t, ∅) + w · (ε(x_t, t, c) − ε(x_t, t, ∅))

w = 1 is plain conditional sampling (one forward, the conditional one: exactly `net(x_t, t, y)`),
w = 0 is unconditional (one forward, with ∅), w > 1 trades diversity for fidelity. Otherwise the
conditional and the unconditional predictions come from ONE forward of the batch stacked twice,
[x_t; x_t] with [c; ∅], so guidance costs one network evaluation of twice the batch per step.

The combination is applied to the network's output as it is, whatever it predicts: x̂_0, v and the
posterior mean are affine in ε at a fixed x_t, and the weights (1 − w) and w sum to one, so guiding
them is guiding ε. For a network that also outputs a variance (the `learned` types), only the first
C channels (the mean's) are guided and the variance channels are the conditional prediction's, as
in GLIDE and improved-diffusion.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch

from ..errors import UserError

ConditionalModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def check_weight(weight) -> float:
    """A guidance weight w as a float: finite and >= 0 (0 unconditional, 1 conditional)."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise UserError(f"guidance weight {weight!r} must be a finite number >= 0 (0: unconditional, 1: plain "
                        f"conditional sampling, above 1: guided towards the class)")
    return float(weight)


class Guided:
    """`model(x_t, t)` of a class-conditional network for fixed labels and guidance weight.

    :param net: `net(x_t, t, y)`, y int64 [B] in 0 … K (K: no class).
    :param labels: one class for every image (an int), or one per image (int64 [B], the batch's
        rows in order). The null class K is allowed: that image is then sampled unconditionally.
    :param weight: w of the formula above.
    :param null_class: K, the label of "no class".
    """

    def __init__(self, net: ConditionalModel, labels: Union[int, torch.Tensor], weight: float = 1.0, *,
                 null_class: int):
        self.net, self.weight, self.null_class = net, check_weight(weight), int(null_class)
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.ndim > 1 or (labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) <= self.null_class)):
            raise UserError(f"class labels must be integers from 0 to {self.null_class} ({self.null_class}: no "
                            f"class), got {labels.tolist() if labels.numel() <= 8 else 'values outside that range'}")
        self.labels = labels
        self._on: dict = {}

    def _labels(self, x: torch.Tensor) -> torch.Tensor:
        """The labels as int64 [B] on x's device (moved once per device)."""
        y = self._on.get(x.device)
        if y is None:
            y = self._on[x.device] = self.labels.to(x.device)
        if y.ndim == 0:
            return y.expand(x.shape[0])
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"Guided holds {y.shape[0]} labels for a batch of {x.shape[0]}")
        return y

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y, w = self._labels(x), self.weight
        if w == 1.0:
            return self.net(x, t, y)
        null = torch.full_like(y, self.null_class)
        if w == 0.0:
            return self.net(x, t, null)
        out = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out.chunk(2)
        C = x.shape[1]
        eps = uncond[:, :C] + w * (cond[:, :C] - uncond[:, :C])
        return torch.cat([eps, cond[:, C:]], dim=1) if cond.shape[1] > C else eps


def conditioned(net, labels: Optional[Union[int, torch.Tensor]], num_classes: int, weight: float = 1.0):
    """`net` as a `model(x_t, t)` for the diffusion: itself for an unconditional network (which
    then must not be given labels or a weight other than 1), else `Guided` (labels None: no class)."""
    if num_classes == 0:
        if labels is not None:
            raise UserError("this model is unconditional (model.num_classes=0): it takes no class; train one with "
                            "model.num_classes=K on labelled data to choose classes")
        if check_weight(weight) != 1.0:
            raise UserError(f"guidance weight {weight} needs a class-conditional model; this one is unconditional "
                            f"(model.num_classes=0)")
        return net
    return Guided(net, num_classes if labels is None else labels, weight, null_class=num_classes)
