"""A small self-contained HTML report: sections of text, tables and PNGs embedded as data URIs.

Embedded, the report renders the same opened from disk, copied alone, or shown by MLflow's
artifact viewer (which serves each artifact on its own URL, so relative image links break);
the PNGs stay beside it as files too.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;color:#222}
h1{font-size:22px;margin-bottom:4px} h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{font-size:14px;margin-bottom:4px}
table{border-collapse:collapse;font-size:12px;margin:8px 0 16px} th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3} td.l,th.l{text-align:left}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px;font-size:13px;margin:8px 0}
.skip{background:#f3f3f3;border-left:4px solid #999;padding:6px 10px;font-size:13px;margin:8px 0}
figure{display:inline-block;margin:6px 10px 12px 0;vertical-align:top} figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:12px;color:#555;max-width:620px}
.meta{font-size:12px;color:#555} nav a{margin-right:12px;font-size:13px}
"""


def fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x) for x in v[:8]) + (" …" if len(v) > 8 else "")
    return "–" if v is None else str(v)


@dataclass
class Section:
    key: str
    title: str
    parts: list[str] = field(default_factory=list)

    def text(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def note(self, text: str) -> None:
        self.parts.append(f'<div class="note">{html.escape(text)}</div>')

    def skip(self, text: str) -> None:
        self.parts.append(f'<div class="skip"><b>Skipped.</b> {html.escape(text)}</div>')

    def table(self, rows: list[dict], columns: list[str] | None = None, caption: str | None = None) -> None:
        if not rows:
            return
        cols = columns or list(rows[0])
        head = "".join(f'<th class="{"l" if i == 0 or isinstance(rows[0].get(c), str) else ""}">'
                       f"{html.escape(str(c))}</th>" for i, c in enumerate(cols))
        body = "".join(
            "<tr>" + "".join(f'<td class="{"l" if i == 0 or isinstance(r.get(c), str) else ""}">'
                             f"{html.escape(fmt(r.get(c)))}</td>" for i, c in enumerate(cols)) + "</tr>"
            for r in rows)
        cap = f"<h3>{html.escape(caption)}</h3>" if caption else ""
        self.parts.append(f"{cap}<table><tr>{head}</tr>{body}</table>")

    def figure(self, path: Path, root: Path, caption: str) -> None:
        """Embed the PNG at ``path`` (a file under ``root``, named in the image's title)."""
        rel = Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        self.parts.append(f'<figure><img src="data:image/png;base64,{data}" title="{html.escape(rel)}" '
                          f'alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>')


@dataclass
class Report:
    title: str
    subtitle: str = ""
    sections: list[Section] = field(default_factory=list)

    def section(self, key: str, title: str) -> Section:
        s = Section(key, title)
        self.sections.append(s)
        return s

    def render(self) -> str:
        nav = " ".join(f'<a href="#{s.key}">{html.escape(s.title)}</a>' for s in self.sections)
        body = "".join(f'<h2 id="{s.key}">{html.escape(s.title)}</h2>' + "".join(s.parts) for s in self.sections)
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{_CSS}</style></head><body><h1>{html.escape(self.title)}</h1>"
                f"<div class='meta'>{html.escape(self.subtitle)}</div><nav>{nav}</nav>{body}</body></html>")

    def write(self, path: Path) -> Path:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.render(), encoding="utf-8")
        tmp.replace(path)
        return path
