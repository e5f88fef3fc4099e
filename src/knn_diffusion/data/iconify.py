"""Emoji styles from Iconify JSON sets (npm ``@iconify-json/*``): SVG bodies rendered with resvg.

A set is one ``icons.json``; its icons are named, not keyed by code point. Every icon is tied to its
emoji's code points - from the set's ``chars.json`` when it ships one, otherwise by matching the icon
name to an emoji's CLDR name, alias or Unicode character name (letters and digits only) - and gets
the same caption as that emoji has in every other style (:func:`sources.emoji_name`), so one emoji
carries one name across styles. Icons that match no emoji (logos, skin-tone swatches) are skipped.
"""

from __future__ import annotations

import io
import json
import re
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from PIL import Image

from knn_diffusion.data.sources import (
    GLYPH_SIZE,
    RawImage,
    SourceError,
    SourceStats,
    SourceUnavailable,
    codepoints,
    emoji_name,
)


def _squashed(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


@lru_cache(maxsize=1)
def _sequences_by_name() -> dict[str, str]:
    """Squashed CLDR name / alias / Unicode name -> fully-qualified emoji sequence (first one wins)."""
    import emoji

    table: dict[str, str] = {}
    for sequence, data in sorted(emoji.EMOJI_DATA.items()):
        if data.get("status") != emoji.STATUS["fully_qualified"]:
            continue
        names = [data["en"], *data.get("alias", [])]
        visible = [ch for ch in sequence if ord(ch) != 0xFE0F]
        if len(visible) == 1:
            names.append(unicodedata.name(visible[0], ""))
        for name in names:
            if name:
                table.setdefault(_squashed(name.strip(":")), sequence)
    return table


def _icon_sequences(root: Path, icons: dict) -> dict[str, str]:
    """icon name -> emoji sequence: ``chars.json`` (hex code points -> name) first, then name matching."""
    chars_file = root / "chars.json"
    by_chars = json.loads(chars_file.read_text()) if chars_file.is_file() else {}
    table = {name: "".join(chr(int(h, 16)) for h in hexes.split("-")) for hexes, name in sorted(by_chars.items())}
    by_name = _sequences_by_name()
    for name in icons:
        if name not in table and _squashed(name) in by_name:
            table[name] = by_name[_squashed(name)]
    return table


def render_svg(svg: str) -> Image.Image | None:
    """RGBA render at the emoji fonts' glyph size, cropped to the drawn pixels (None when blank)."""
    import resvg_py

    png = resvg_py.svg_to_bytes(svg_string=svg, width=GLYPH_SIZE, height=GLYPH_SIZE, skip_system_fonts=True)
    image = Image.open(io.BytesIO(bytes(png))).convert("RGBA")
    bbox = image.getchannel("A").getbbox()
    return image.crop(bbox) if bbox else None


def iconify_items(path: str | None, stats: SourceStats, limit: int | None = None) -> Iterator[RawImage]:
    """Every icon of the Iconify set at ``path`` (its ``icons.json``) that is an emoji, in name order."""
    icons_file = Path(path or "")
    if not icons_file.is_file():
        raise SourceUnavailable(f"iconify source: '{icons_file}' not found (scripts/setup.sh installs the "
                                "emoji styles of emoji-styles/package.json with npm ci)")
    try:
        data = json.loads(icons_file.read_text())
        icons, width, height = data["icons"], data.get("width", 16), data.get("height", 16)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise SourceError(f"iconify source: '{icons_file}' is not an Iconify icon set ({err})") from None
    sequences = _icon_sequences(icons_file.parent, icons)
    for name in sorted(icons):
        if limit is not None and stats.yielded >= limit:
            return
        sequence = sequences.get(name)
        if sequence is None:
            stats.skip("not an emoji", f"{icons_file}:{name}", quiet=True)  # logos, swatches: expected
            continue
        icon = icons[name]
        w, h = icon.get("width", width), icon.get("height", height)
        svg = (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
               f'viewBox="{icon.get("left", 0)} {icon.get("top", 0)} {w} {h}">{icon["body"]}</svg>')
        try:
            image = render_svg(svg)
        except ValueError as err:
            stats.skip("unrenderable svg", f"{icons_file}:{name}", str(err))
            continue
        if image is None:
            stats.skip("blank svg", f"{icons_file}:{name}")
            continue
        stats.yielded += 1
        yield RawImage(origin=codepoints(sequence), image=image, caption=emoji_name(sequence), is_glyph=True)
