"""The log's tallies (workflows/train.py's Tallies): a logged line states means over the steps
since the previous line (docs: metrics.jsonl's loss, loss_q0-3, loss_by_class, grad_norm). Those
means, computed here from the losses as they were added, are what `record` reports."""

import pytest
import torch

from ddpm.io.distributed import DistInfo
from ddpm.workflows.train import Tallies

T = 1000


def _step(tallies, losses, t, y=None, grad_norm=1.0, applied=None):
    tallies.add(torch.tensor(losses), torch.tensor(t), None if y is None else torch.tensor(y))
    tallies.commit(torch.tensor(grad_norm), None if applied is None else torch.tensor(float(applied)))


def test_a_logged_line_holds_the_means_of_the_steps_since_the_last_one():
    tallies = Tallies(2, T, "cpu", fp16=False)
    _step(tallies, [9.0, 9.0], [1, 2], [0, 0], grad_norm=9.0)
    tallies.reset()  # a line was logged: the next one covers what follows
    # two steps (one of two micro-batches); t = 1 … 250 is the first quartile, 751 … 1000 the last
    _step(tallies, [1.0, 2.0, 3.0, 4.0], [1, 250, 251, 1000], [0, 1, 1, 1], grad_norm=2.0)
    tallies.add(torch.tensor([5.0]), torch.tensor([999]), torch.tensor([0]))
    _step(tallies, [6.0], [500], [1], grad_norm=4.0)
    rec = tallies.record(7, 1e-4, 8, {"names": ["a", "b"]}, torch.amp.GradScaler("cpu", enabled=False), DistInfo())
    assert rec["step"] == 7 and rec["lr"] == 1e-4
    assert rec["loss"] == pytest.approx((1 + 2 + 3 + 4 + 5 + 6) / 6)
    assert rec["grad_norm"] == pytest.approx((2.0 + 4.0) / 2)
    # by quartile: t = 1, 250 | 251, 500 | none (None, not 0) | 999, 1000
    assert [rec[f"loss_q{i}"] for i in range(4)] == [1.5, 4.5, None, 4.5]
    assert rec["loss_by_class"] == pytest.approx({"a": (1 + 5) / 2, "b": (2 + 3 + 4 + 6) / 4})


def test_fp16_steps_the_scaler_skipped_are_counted_not_averaged():
    tallies = Tallies(0, T, "cpu", fp16=True)
    _step(tallies, [1.0, 3.0], [1, 1000], grad_norm=1.0, applied=1)
    _step(tallies, [float("inf"), 5.0], [1, 1000], grad_norm=float("inf"), applied=0)  # overflowed, skipped
    _step(tallies, [5.0, 7.0], [1, 1000], grad_norm=3.0, applied=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    rec = tallies.record(3, 1e-4, 2, None, scaler, DistInfo())
    assert rec["loss"] == pytest.approx((1 + 3 + 5 + 7) / 4)
    assert rec["grad_norm"] == pytest.approx((1.0 + 0.0 + 3.0) / 3)  # a skipped step's norm counts as 0
    assert rec["skipped_steps"] == 1 and rec["loss_scale"] == 2.0 ** 10
    assert tallies.finite() and not tallies.stuck()
