"""Figure for the README: patterns of two opposite classes (RU, LD) at a Nb-O column, their difference, and an
example composed scan's label map. Reads the committed library; writes docs/physics_patterns.png.

    .venv/bin/python docs/make_physics_figure.py
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from polcore.simulate import load_library
from polcore.simulate.composer import DEFAULT_SCANS, compose_scan
from polcore.types import CLASS_NAMES

OUT = Path(__file__).with_name("physics_patterns.png")
SCALE = 4


def _font(size=14):
    try:
        return ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default()


def _gray(img, lo=None, hi=None):
    lo = img.min() if lo is None else lo
    hi = img.max() if hi is None else hi
    u = np.clip((img - lo) / (hi - lo + 1e-12), 0, 1)
    return np.stack([u * 255] * 3, -1).astype(np.uint8)


def _diverging(img):
    m = np.abs(img).max() + 1e-12
    u = img / m
    r = np.where(u > 0, 255, 255 * (1 + u))
    b = np.where(u < 0, 255, 255 * (1 - u))
    g = 255 * (1 - np.abs(u))
    return np.stack([r, g, b], -1).astype(np.uint8)


def _classes(label):
    rgb = np.zeros(label.shape + (3,), np.uint8) + 128
    for k in range(8):
        r, g, b = colorsys.hsv_to_rgb(k / 8, 0.85, 0.9)
        rgb[label == k] = (int(r * 255), int(g * 255), int(b * 255))
    return rgb


def _panel(rgb, title):
    im = Image.fromarray(rgb).resize((rgb.shape[1] * SCALE, rgb.shape[0] * SCALE), Image.NEAREST)
    canvas = Image.new("RGB", (im.width + 20, im.height + 40), "white")
    canvas.paste(im, (10, 30))
    ImageDraw.Draw(canvas).text((10, 6), title, fill="black", font=_font())
    return canvas


def main():
    lib = load_library()
    t = lib.thickness_index(20)
    ru = int(np.flatnonzero(lib.variant_class == CLASS_NAMES.index("RU"))[0])
    ld = int(np.flatnonzero(lib.variant_class == CLASS_NAMES.index("LD"))[0])
    c = int(np.flatnonzero(lib.configs["role"] == "test")[0])
    n = lib.patterns.shape[3] // 2  # probe at (1/2, 1/2) of the cell: the Nb-O column
    a, b = lib.patterns[ru, c, t, n, n], lib.patterns[ld, c, t, n, n]
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    avg = np.linalg.norm(lib.patterns[ru, c, t].mean((0, 1)) - lib.patterns[ld, c, t].mean((0, 1))) / np.linalg.norm(
        lib.patterns[ru, c, t].mean((0, 1)))
    hi = max(a.max(), b.max()) ** 0.5
    kind, row, cfg = DEFAULT_SCANS["syn_20nm_stripes"]
    truth, _ = compose_scan(cfg, lib)
    panels = [
        _panel(_gray(a**0.5, 0, hi), "RU at Nb-O column (sqrt)"),
        _panel(_gray(b**0.5, 0, hi), "LD (opposite), same config"),
        _panel(_diverging(a - b), f"RU - LD: {100 * rel:.0f} % (avg {100 * avg:.1f} %)"),
        _panel(_classes(truth["label"]), "composed scan: label map"),
    ]
    W = sum(p.width for p in panels)
    H = max(p.height for p in panels) + 30
    fig = Image.new("RGB", (W, H), "white")
    x = 0
    for p in panels:
        fig.paste(p, (x, 0))
        x += p.width
    legend = "  ".join(f"{k} {name}" for k, name in enumerate(CLASS_NAMES))
    ImageDraw.Draw(fig).text((10, H - 24), f"20 nm, 200 kV, {lib.meta['convergence_mrad']:.0f} mrad; classes: "
                             f"{legend} (hue = angle)", fill="black", font=_font(12))
    fig.save(OUT)
    print(f"wrote {OUT}: relative difference at Nb-O {rel:.3f}, position-averaged {avg:.3f}")


if __name__ == "__main__":
    main()
