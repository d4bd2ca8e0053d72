"""Figures shared by the reports (``nfe``, ``compare``): labelled images side by side."""

from __future__ import annotations

from pathlib import Path


def side_by_side(grids: dict[str, Path], path: Path, min_width: int = 192,
                 columns: int | None = None) -> None:
    """Labelled images ({label: png}) next to each other, each under its label; small images
    are enlarged by an integer factor (nearest neighbour, pixels stay sharp) to ``min_width``,
    and each column is as wide as its widest label or image. ``columns``: images per row (the
    rest wrap onto further rows); None = all in one row."""
    from matplotlib import font_manager
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), 13)  # has Greek letters
    images = {}
    for label, p in grids.items():
        im = Image.open(p).convert("RGB")
        k = max(1, -(-min_width // im.width))
        images[label] = im.resize((im.width * k, im.height * k), Image.NEAREST) if k > 1 else im
    if not images:
        return
    pad, label_h = 12, 28
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = {s: max(im.width, int(measure.textlength(s, font=font)))
              for s, im in images.items()}
    items = list(images.items())
    n = min(columns or len(items), len(items))
    rows = [items[i:i + n] for i in range(0, len(items), n)]
    col_w = [max(widths[row[c][0]] for row in rows if c < len(row)) for c in range(n)]
    row_h = [max(im.height for _, im in row) + label_h + pad for row in rows]
    canvas = Image.new("RGB", (sum(col_w) + pad * (n + 1), sum(row_h) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    y = pad
    for row, h in zip(rows, row_h):
        x = pad
        for c, (s, im) in enumerate(row):
            draw.text((x, y), s, fill="black", font=font)
            canvas.paste(im, (x, y + label_h))
            x += col_w[c] + pad
        y += h
    canvas.save(path)


def stack_rows(paths, path: Path) -> None:
    """Row images (one per NFE, in order) stacked top to bottom."""
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    canvas = Image.new("RGB", (max(im.width for im in images), sum(im.height for im in images)),
                       "white")
    y = 0
    for im in images:
        canvas.paste(im, (0, y))
        y += im.height
    canvas.save(path)
