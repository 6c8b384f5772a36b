"""The options that travel together through the commands on a trained model, as typed, frozen configs.

    model = ModelSpec("runs/cifar10", weights="ema", device="auto", fast="auto", precision="fp32")  # run/load.py
    guidance = GuidanceSpec(ClassChoice(per_class=8), weight=3.0)
    inception = InceptionSpec(file=None, sha256=OFFICIAL, batch=100)
    ddpm.sample_run(model, "samples", None, sampler=SamplerSpec("ddim", steps=50), guidance=guidance)

Each is validated once, when it is built (an unknown string is one line naming the option, the
value and the valid choices: config.Choice), and each default is written once, here, in
`run.load.ModelSpec` and in `process.sampling.SamplerSpec`. Results files record the options
under the names they always had ("guidance", "classes", "ddim_eta", …).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

from ..config import Config
from ..errors import UserError
from ..io.inception_weights import OFFICIAL
from ..process.guidance import check_weight


class ClassChoice(NamedTuple):
    """Which classes a sample set of a conditional model has (the `ddpm sample` options).

    :param class_: every image of this class (an index, a class name, or "none": no class, i.e.
        unconditional samples from the conditional model).
    :param classes: image i of class classes[i % len(classes)] (indices or names).
    :param per_class: N images of each class (of `classes`, default all), class by class: the set
        has N·K images. Nothing given: classes in the training set's proportions.
    """

    class_: Union[int, str, None] = None
    classes: Optional[Sequence[Union[int, str]]] = None
    per_class: Optional[int] = None

    def given(self) -> bool:
        return self.class_ is not None or self.classes is not None or self.per_class is not None


@dataclass(frozen=True)
class GuidanceSpec(Config):
    """A class-conditional model's classes and classifier-free guidance weight w (process/guidance.py;
    w = 1 is plain conditional sampling, 0 unconditional). An unconditional model takes the
    defaults only (checked where the model is known)."""

    classes: ClassChoice = ClassChoice()
    weight: float = 1.0

    def validate(self) -> None:
        if not isinstance(self.classes, ClassChoice):
            raise UserError(f"guidance classes={self.classes!r}: give a ClassChoice(class_, classes, per_class)")
        object.__setattr__(self, "weight", check_weight(self.weight))


@dataclass(frozen=True)
class InceptionSpec(Config):
    """The Inception-v3 that FID, KID and IS are measured with (docs/FID.md).

    :param file: its weights file (None: $DDPM_INCEPTION_WEIGHTS, then the cache path, then the
        pytorch-fid package: `io.inception_weights.resolve_weights`).
    :param sha256: OFFICIAL: the file must be one of the official ones, by their pinned sha256; a
        hex prefix: the file's sha256 must start with it; None: not checked (recorded).
    :param batch: images per Inception forward, per process.
    """

    file: Union[str, Path, None] = None
    sha256: Optional[str] = OFFICIAL
    batch: int = 100
