"""Strings from a user's data or config are shown as text wherever they land: the model card is
rendered by a CommonMark parser (markdown-it-py) and the report read by Python's HTML parser, and
neither finds an element the string brought in; matplotlib draws a class name that would be
mathtext as the name itself."""

import html.parser
import json

import numpy as np
import pytest
import torch

from ddpm.cli import main
from ddpm.io.checkpoint import save_checkpoint
from ddpm.io.escape import markdown_text, plot_text
from ddpm.network.unet import UNet
from ddpm.run.config import RunConfig
from ddpm.workflows.export import export_run
from ddpm.run.load import load_run

markdown_it = pytest.importorskip("markdown_it", reason="the test extra installs markdown-it-py")
pytestmark = pytest.mark.usefixtures("one_thread")

HOSTILE = "<b onmouseover=alert(3)>data\n## Injected heading\n[click](javascript:alert(4)) *x* `y` | z $\\frac$"
SHOWN = HOSTILE.replace("\n", "\\n")  # one line: the break shown as its escape


class _Elements(html.parser.HTMLParser):
    """Every start tag with its attributes, and the text, of an HTML page."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.tags, self.text = [], []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _render(markdown: str) -> _Elements:
    return _Elements(markdown_it.MarkdownIt("commonmark").render(markdown))  # raw HTML allowed, as on the Hub


def test_markdown_text_renders_as_exactly_the_text():
    for text in (HOSTILE, "a\\b", "1. not a list", "- not an item", "> not a quote", "<!-- c -->", "&amp; &lt;",
                 "caf\udce9", "tab\there", "***", "![img](x.png)", "    four spaces"):
        page = _render(markdown_text(text))
        assert [t for t, _ in page.tags] == ["p"], (text, page.tags)
        shown = "".join(page.text).strip()
        assert shown == text.replace("\n", "\\n").replace("\t", "\\t").replace("\udce9", "\\udce9").strip(), text


def test_the_model_card_shows_the_data_and_evaluation_strings_as_text(tmp_path):
    run = RunConfig.from_preset("tiny")
    run = run.replace(data=run.data.replace(source=HOSTILE))
    torch.manual_seed(0)
    sd = UNet.from_config(run.model).state_dict()
    ckpt = save_checkpoint(tmp_path / "run", 1, dict(step=1, model=sd, ema=sd, config=run.to_dict()))
    ev = tmp_path / "run" / "eval" / ckpt.stem
    ev.mkdir(parents=True)
    (ev / "eval.json").write_text(json.dumps(dict(checkpoint_sha256=load_run(ckpt).sha256, n_samples=50,
                                                  fid={"<script>x</script>": 3.5, "<i>t</i>": 1.5})))
    export_run(ckpt, tmp_path / "pipe")
    card = (tmp_path / "pipe" / "README.md").read_text(encoding="utf-8")
    page = _render(card.split("---\n", 2)[2])  # the Hub shows the card without its YAML front matter
    tags = [t for t, _ in page.tags]
    assert not {"b", "i", "script", "em", "img"} & set(tags), tags
    assert tags.count("h2") == 4  # Use, Training, Evaluation, Differences: no injected heading
    assert all(not a.get("href", "").startswith("javascript") for _, a in page.tags)
    text = "".join(page.text)
    assert SHOWN in text and "<i>t</i> split" in text and "<script>x</script> split" in text


def test_the_report_shows_strings_as_text_and_plots_class_names_that_look_like_mathtext(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.integers(0, 256, (4, 32, 32), dtype=np.uint8))
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", str(data), "--out", str(run), "--steps", "2",
                 "--checkpoint-every", "2", "--set", "diffusion.T=20", "--no-progress"]) == 0
    names = ["$\\notacommand{$", "$x$", HOSTILE]
    with open(run / "metrics.jsonl", "a") as f:
        for step in (2, 3):
            f.write(json.dumps(dict(step=step, loss=0.5, loss_by_class={n: 0.4 for n in names})) + "\n")
    ev = run / "eval" / "ckpt-00000002"
    ev.mkdir(parents=True)
    (ev / "eval.json").write_text(json.dumps(dict(n_samples=50, fid={"<script>alert(1)</script>": 1.0, "<b>t</b>": 2.0},
                                                  references={"<b>r</b>": {"path": "<b>p</b>"}})))
    assert main(["report", str(run)]) == 0
    page = _Elements((run / "report.html").read_text(encoding="utf-8"))
    assert not {"b", "script"} & {t for t, _ in page.tags}
    text = "".join(page.text)
    assert "FID, <script>alert(1)</script> split" in text and "<b>r</b>: <b>p</b>" in text


def test_plot_text_is_never_mathtext():
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    for name in ("$\\notacommand{$", "$x^2$", "a$b$c", "\\$5"):
        fig = Figure()
        FigureCanvasAgg(fig)
        escaped, plain = fig.text(0, 0, plot_text(name)), fig.text(0, 0.5, name, parse_math=False)
        fig.canvas.draw()  # mathtext that does not parse raises here
        r = fig.canvas.get_renderer()
        assert escaped.get_window_extent(r).width == plain.get_window_extent(r).width, name  # the same glyphs
