"""Figures shared by the reports (``nfe``, ``compare``): labelled images side by side."""

from __future__ import annotations

from pathlib import Path


def side_by_side(grids: dict[str, Path], path: Path, min_width: int = 192) -> None:
    """Labelled images ({label: png}) next to each other, each under its label; small images
    are enlarged by an integer factor (nearest neighbour, pixels stay sharp) to ``min_width``,
    and each column is as wide as its label."""
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
    width = sum(widths.values()) + pad * (len(images) + 1)
    height = max(im.height for im in images.values()) + label_h + 2 * pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = pad
    for s, im in images.items():
        draw.text((x, pad), s, fill="black", font=font)
        canvas.paste(im, (x, pad + label_h))
        x += widths[s] + pad
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
