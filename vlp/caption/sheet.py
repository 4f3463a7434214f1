"""An HTML contact sheet of captioned images: thumbnail, generated caption, references.

One self-contained file (thumbnails inlined as JPEG data URIs) to look through by eye;
capped at `limit` rows so a large run still gives a file a browser opens quickly.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image

from vlp.atomic import atomic_write_text

THUMBNAIL = 160

_STYLE = """body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}
td{border-bottom:1px solid #ddd;padding:6px;vertical-align:top}td.img img{width:128px;
image-rendering:pixelated}.gen{font-weight:bold}.ref{color:#555;font-size:90%}.key{color:#999;font-size:80%}"""


def thumbnail_uri(image: Image.Image) -> str:
    image = image.convert("RGB")
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


class ContactSheet:
    """Rows are added as images are captioned; `write` renders what was added."""

    def __init__(self, title: str, limit: int = 500):
        self.title, self.limit = title, limit
        self.rows: list[str] = []
        self.total = 0

    def add(self, key: str, image: Image.Image, caption: str, references: list[str] = ()) -> None:
        self.total += 1
        if len(self.rows) >= self.limit:
            return
        refs = "".join(f'<div class="ref">{html.escape(r)}</div>' for r in references)
        self.rows.append(f'<tr><td class="img"><img src="{thumbnail_uri(image)}" alt=""></td>'
                         f'<td><div class="gen">{html.escape(caption)}</div>{refs}'
                         f'<div class="key">{html.escape(key)}</div></td></tr>')

    def write(self, path: str | Path) -> None:
        shown = (f"all {self.total} images" if self.total <= self.limit
                 else f"the first {self.limit} of {self.total} images")
        page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{_STYLE}</style></head><body><h2>{html.escape(self.title)}</h2>"
                f"<p>{shown}; bold: generated caption, grey: reference captions</p>"
                f"<table>{''.join(self.rows)}</table></body></html>\n")
        atomic_write_text(path, page)
