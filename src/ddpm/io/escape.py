"""Strings from a user's data or config, escaped for where they land.

A folder name, a class name or a config value can hold anything a file system allows: markup,
line breaks, control characters. Written as they are into a model card they become headings,
links and raw HTML; into a plot they become matplotlib's mathtext (and a stray "$\\" stops the
plot). Every such string goes through the function for its destination:

- HTML (the report): `html_text` (one line, then the standard library's `html.escape`);
- Markdown (the model card): `markdown_text`;
- matplotlib text (titles, legends): `plot_text`.

Written here because no dependency of ours escapes Markdown: CommonMark allows any ASCII
punctuation to be escaped with a backslash, which is all it takes.
"""

from __future__ import annotations

import html
import re
import string

_PUNCTUATION = re.compile("([" + re.escape(string.punctuation) + "])")
_LEADING_SPACES = re.compile(r"^ +")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")  # and a file name's undecodable bytes


def one_line(text) -> str:
    """`text` as one line of visible characters: each line break or other control character shown
    as its escape sequence (a newline as \\n, a file name's undecodable byte as \\udcXX), so
    nothing starts a new block, hides, or fails to encode as UTF-8."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


def markdown_text(text) -> str:
    """`text` as Markdown that renders as exactly that text: one line, every ASCII punctuation
    character backslash-escaped (no tag, link, heading, emphasis or table cell can start)."""
    escaped = _PUNCTUATION.sub(r"\\\1", one_line(text))
    return _LEADING_SPACES.sub(lambda m: "&#32;" * len(m.group()), escaped)  # an indent would start a code block


def html_text(text) -> str:
    """`text` as HTML that shows exactly that text, on one line."""
    return html.escape(one_line(text))


def plot_text(text) -> str:
    """`text` for a matplotlib title or legend: one line, "$" escaped, so it is never mathtext."""
    return one_line(text).replace("$", r"\$")
