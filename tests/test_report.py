"""`ddpm report`: one self-contained page. Every image is an inline PNG that decodes; nothing is
fetched; and, where Debian's `chromium` is installed, a headless browser loads it with every image
drawn and no console error (the browser check skips without it: CI has none)."""

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.cli import main
from ddpm.workflows.nll import NLLImages, evaluate_nll


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    run = root / "run"
    rng = np.random.default_rng(0)
    data = root / "labelled.npz"
    np.savez(data, x=rng.integers(0, 256, (16, 32, 32), dtype=np.uint8), labels=np.arange(16) % 10)
    assert main(["train", "--preset", "tiny", "--data", str(data), "--out", str(run), "--steps", "4", "--checkpoint-every", "4",
                 "--set", "diffusion.T=20", "--set", "train.log_every=2", "--set", "train.sample_every=2",
                 "--set", "train.sample_n=4", "--set", "model.num_classes=10", "--no-progress"]) == 0
    # an evaluation of the checkpoint: its bits/dim by t (real), and the numbers eval.json would hold
    from ddpm.run.load import load_run
    loaded = load_run(run)
    ev = run / "eval" / loaded.checkpoint.stem
    images = torch.from_numpy(np.load(data)["x"][:2, None])
    evaluate_nll(loaded.model, loaded.diffusion, ev / "nll", NLLImages(images, 2, 0, torch.tensor([0, 1])), progress=False)
    (ev / "eval.json").write_text(json.dumps(dict(n_samples=50, fid=dict(train=123.4, test=None),
                                                  inception_score=dict(is_mean=1.5, is_std=0.1))))
    # FID during training: the records train.fid_every appends to metrics.jsonl (Inception's weights
    # cannot be had offline, and tests/test_fid.py checks the measurement itself)
    with open(run / "metrics.jsonl", "a") as f:
        for step, fid in ((2, 310.5), (4, 287.25)):
            f.write(json.dumps(dict(step=step, fid=fid, is_mean=1.2, is_std=0.1, fid_n=50, fid_seconds=3.0)) + "\n")
    assert main(["report", str(run)]) == 0
    return run / "report.html"


def test_the_page_holds_everything_inline(report):
    page = report.read_text()
    assert "<script" not in page and not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page)
    srcs = re.findall(r'<img[^>]* src="([^"]+)"', page)
    # the two training grids, the training plots (loss, optimiser, throughput, by class, FID), bits/dim by t and
    # rate-distortion
    assert len(srcs) >= 2 + 5 + 2
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    for text in ("Training loss, and by timestep quartile", "Loss by class", "EMA samples at step 4",
                 "FID during training", "FID, train split", "123.400", "&quot;num_classes&quot;: 10"):
        assert text in page, text


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_a_headless_browser_draws_every_image_without_console_errors(report, tmp_path):
    # A copy with a probe appended: the title becomes the number of images the browser could not draw.
    probe = ("<script>addEventListener('load',()=>{document.title='broken:'+[...document.images]"
             ".filter(i=>!i.complete||i.naturalWidth===0).length})</script>")
    page = tmp_path / "page.html"
    page.write_text(report.read_text().replace("</body>", probe + "</body>"))
    r = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                        "--virtual-time-budget=5000", "--dump-dom", page.as_uri()], capture_output=True, text=True,
                       timeout=120)
    assert "<title>broken:0</title>" in r.stdout, r.stdout[:300]
    console = [line for line in r.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
