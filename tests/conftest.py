import os
import random
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image


def pytest_configure(config):
    # Sources of image files are prepared into a cache on first use (io/prepared.py): the tests'
    # cache is a fresh folder of their own (subprocesses inherit it), never the user's.
    os.environ["DDPM_CACHE_DIR"] = tempfile.mkdtemp(prefix="ddpm-test-cache-")


@pytest.fixture(scope="module")
def one_thread():
    """One OpenMP thread for modules of many tiny ops: on a shared 2-core machine two threads spend
    most of their time waiting for each other (measured 25 s vs 0.9 s for 1000 ancestral steps)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def same_random_state_for_every_test():
    """Every test starts from the same global random state, whichever tests ran before it on its
    worker: a test that draws from the global generators is then as reproducible as one that
    seeds its own (pytest-xdist gives each worker a different, changing share of the tests)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run of the tiny preset trained 2 steps on eight 16x16 squares (T = 20), with img0 … img2.png of its data."""
    from ddpm.run.config import RunConfig
    from ddpm.workflows.train import train

    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    x = np.full((8, 16, 16), 30, np.uint8)
    for i in range(8):
        r, c = rng.integers(0, 10, 2)
        x[i, r:r + 6, c:c + 6] = 220
    np.savez(root / "squares.npz", x=x)
    for i in range(3):
        Image.fromarray(x[i]).save(root / f"img{i}.png")
    run = RunConfig.from_preset("tiny", data=str(root / "squares.npz"))
    run = run.replace(model=run.model.replace(resolution=16), data=run.data.replace(resolution=16),
                      diffusion=run.diffusion.replace(T=20), train=run.train.replace(steps=2, checkpoint_every=2))
    train(root / "run", run, progress=False)
    return root
