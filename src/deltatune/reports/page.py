"""Sections of a report, rendered twice: one self-contained HTML file and a markdown file.

The HTML needs nothing but itself: images are embedded as data: URIs, the CSS is inline, there is no
script and no link to anything outside the page (it opens offline, from a mail attachment, in CI
artifacts). The markdown is for terminals and pull requests: its images are PNG files written next to it.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Table:
    header: list[str]
    rows: list[list[object]]


@dataclass
class Image:
    name: str  # file stem of the PNG next to the markdown, e.g. "loss"
    png: bytes
    alt: str


@dataclass
class Text:
    text: str
    kind: str = "p"  # p: a paragraph; note: something missing or worth a warning; pre: preformatted (config)


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Table | Image | Text] = field(default_factory=list)


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: .5em 0; }
td, th { border: 1px solid #ccc; padding: .25em .6em; text-align: left; }
th { background: #f2f2f2; }
img { max-width: 100%; display: block; margin: .5em 0; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; font-size: .85em; }
.note { color: #8a5a00; background: #fff8e1; padding: .4em .8em; border-left: 4px solid #f0b400; }
.subtitle { color: #555; }
"""


def cell(value: object) -> str:
    """How a number or value reads in a table: thousands separated, floats to 4 significant digits."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 10_000 else f"{value:.4g}"
    return str(value)


def _html_block(block: Table | Image | Text) -> str:
    if isinstance(block, Table):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(v))}</td>" for v in row) + "</tr>"
                       for row in block.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(block, Image):
        data = base64.b64encode(block.png).decode("ascii")
        return f'<img alt="{html.escape(block.alt)}" src="data:image/png;base64,{data}">'
    if block.kind == "pre":
        return f"<pre>{html.escape(block.text)}</pre>"
    klass = ' class="note"' if block.kind == "note" else ""
    return f"<p{klass}>{html.escape(block.text)}</p>"


def render_html(title: str, subtitle: str, sections: list[Section]) -> str:
    nav = " ".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections)
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
             f'<p class="subtitle">{html.escape(subtitle)}</p>', f"<nav>{nav}</nav>"]
    for s in sections:
        parts.append(f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2>')
        parts.extend(_html_block(b) for b in s.blocks)
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _md_escape(value: object) -> str:
    return cell(value).replace("|", "\\|").replace("\n", " ")


def _md_block(block: Table | Image | Text, image_prefix: str) -> str:
    if isinstance(block, Table):
        lines = ["| " + " | ".join(_md_escape(h) for h in block.header) + " |",
                 "|" + "---|" * len(block.header)]
        lines += ["| " + " | ".join(_md_escape(v) for v in row) + " |" for row in block.rows]
        return "\n".join(lines)
    if isinstance(block, Image):
        return f"![{block.alt}]({image_prefix}{block.name}.png)"
    if block.kind == "pre":
        return f"```\n{block.text.rstrip()}\n```"
    return f"> **note:** {block.text}" if block.kind == "note" else block.text


def render_markdown(title: str, subtitle: str, sections: list[Section], image_prefix: str) -> str:
    parts = [f"# {title}", subtitle]
    for s in sections:
        parts.append(f"## {s.title}")
        parts.extend(_md_block(b, image_prefix) for b in s.blocks)
    return "\n\n".join(parts) + "\n"


def write(title: str, subtitle: str, sections: list[Section], html_path: Path) -> dict[str, Path]:
    """Write `html_path` and the markdown beside it (same stem, .md) with its PNGs as `<stem>-<name>.png`.

    Returns every written path: `html`, `md` and one `png:<name>` per image."""
    html_path.parent.mkdir(parents=True, exist_ok=True)
    stem = html_path.stem
    md_path = html_path.with_suffix(".md")
    written = {"html": html_path, "md": md_path}
    for s in sections:
        for b in s.blocks:
            if isinstance(b, Image):
                path = html_path.parent / f"{stem}-{b.name}.png"
                path.write_bytes(b.png)
                written[f"png:{b.name}"] = path
    html_path.write_text(render_html(title, subtitle, sections), encoding="utf-8")
    md_path.write_text(render_markdown(title, subtitle, sections, f"{stem}-"), encoding="utf-8")
    return written
