"""Report pages: a list of :class:`Section` s rendered as Markdown and as HTML, and the small
TOML writer for specs.

A page shows its results first and its settings after (issue 15.6: the reproduction report
used to open with a long block of prose): the caller orders the sections, and
:func:`render_html` adds a one-line table of contents so a reader can jump to any of them.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DocTable:
    """A table of a page. ``shades`` (optional, same shape as ``rows``): a value in [-1, 1]
    per cell that colours its background in HTML on a diverging scale (red below zero, blue
    above, white at zero); None leaves a cell uncoloured."""

    header: list[str]
    rows: list[list[str]]
    shades: list[list[float | None]] | None = None


@dataclass
class Section:
    """A part of the report, rendered to both Markdown and HTML."""

    title: str
    text: list[str] = field(default_factory=list)
    tables: list[DocTable] = field(default_factory=list)
    images: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption)
    code: str | None = None

    def table(self, header: list[str], rows: list[list[str]],
              shades: list[list[float | None]] | None = None) -> None:
        self.tables.append(DocTable(header, rows, shades))


def duration(seconds: float) -> str:
    """``2 h 05 min``, ``4 min 10 s`` or ``12 s``."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


def render_markdown(title: str, sections: Sequence[Section]) -> str:
    lines = [f"# {title}", ""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        for p in s.text:
            lines += [p, ""]
        for t in s.tables:
            lines.append("| " + " | ".join(t.header) + " |")
            lines.append("|" + "---|" * len(t.header))
            lines += ["| " + " | ".join(r) + " |" for r in t.rows]
            lines.append("")
        for name, caption in s.images:
            lines += [f"![{caption}]({name})", ""]
        if s.code:
            lines += ["```toml", s.code.rstrip(), "```", ""]
    return "\n".join(lines)


def markdown_html(text: str) -> str:
    """The little Markdown the report's texts use — paragraphs, ``- `` bullet lists (with
    indented continuation lines), ``**bold**`` and ```code``` — as HTML, everything escaped."""
    def inline(t: str) -> str:
        t = html.escape(t)
        t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", t)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", t)

    out = []
    for block in re.split(r"\n\s*\n", text.strip()):
        if block.startswith("- "):
            items = re.split(r"\n- ", block[2:])
            out.append("<ul>" + "".join(f"<li>{inline(' '.join(i.split()))}</li>"
                                        for i in items) + "</ul>")
        else:
            out.append(f"<p>{inline(' '.join(block.split()))}</p>")
    return "".join(out)


def shade_colour(value: float) -> str:
    """A diverging background for ``value`` in [-1, 1]: red (#b2182b) at -1, white at 0, blue
    (#2166ac) at +1, linear in between (ColorBrewer's RdBu ends)."""
    v = max(-1.0, min(1.0, value))
    end = (0xB2, 0x18, 0x2B) if v < 0 else (0x21, 0x66, 0xAC)
    mix = [round(255 + (c - 255) * abs(v)) for c in end]
    return "#" + "".join(f"{c:02x}" for c in mix)


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _html_table(t: DocTable) -> list[str]:
    e = html.escape
    parts = ["<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in t.header) + "</tr>"]
    for i, row in enumerate(t.rows):
        cells = []
        for j, c in enumerate(row):
            shade = t.shades[i][j] if t.shades is not None else None
            style = "" if shade is None else f" style='background:{shade_colour(shade)}" + (
                ";color:white" if abs(shade) > 0.6 else "") + "'"
            cells.append(f"<td{style}>{e(c)}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    return parts


_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
          "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px "
          "8px;text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:"
          "100%}pre{background:#f5f5f5;padding:1em;overflow:auto}nav{font-size:90%;color:#555}")


def render_html(title: str, sections: Sequence[Section]) -> str:
    e = html.escape
    parts = ["<!doctype html>", "<html><head><meta charset='utf-8'>", f"<title>{e(title)}</title>",
             f"<style>{_STYLE}</style>", "</head><body>", f"<h1>{e(title)}</h1>"]
    if len(sections) > 1:
        parts.append("<nav>" + " · ".join(f"<a href='#{_anchor(s.title)}'>{e(s.title)}</a>"
                                          for s in sections) + "</nav>")
    for s in sections:
        parts.append(f"<h2 id='{_anchor(s.title)}'>{e(s.title)}</h2>")
        parts += [markdown_html(p) for p in s.text]
        for t in s.tables:
            parts += _html_table(t)
        parts += [f"<figure><img src='{e(name)}' alt='{e(cap)}'><figcaption>{e(cap)}"
                  "</figcaption></figure>" for name, cap in s.images]
        if s.code:
            parts.append(f"<pre>{e(s.code)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def to_toml(data: dict[str, Any]) -> str:
    """A small TOML writer for specs (strings, numbers, booleans, lists, nested tables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    lines: list[str] = []

    def table(prefix: str, d: dict[str, Any]) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict) and v is not None}
        if prefix and (scalars or not d):
            lines.append(f"\n[{prefix}]")
        lines.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        for k, v in d.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}" if prefix else k, v)

    table("", data)
    return "\n".join(lines).lstrip("\n") + "\n"
