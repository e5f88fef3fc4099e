"""A taming-transformers VQGAN checkpoint loaded as a diffusers VQModel: checked against taming's own modules
(PyPI taming-transformers-rom1504) on real glyphs, through the library and the tokenizer stage."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.vqvae.quantize import GumbelQuantize, VectorQuantizer2
from torch import nn

from knn_diffusion.data.store import ImageStore
from knn_diffusion.io import content_sha256
from knn_diffusion.models.discrete.taming import load_pretrained_tokenizer
from knn_diffusion.models.discrete.vq import Tokenizer, to_unit_range
from knn_diffusion.stages import ingest, paths, tokenizer
from tests.glyphs import OPENMOJI_FONT, named_emoji, render

# Two levels (32 px -> 16x16 codes), attention at side 16 (the second level) and in the middle, as VQGAN has.
DDCONFIG = {"double_z": False, "z_channels": 8, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [16], "dropout": 0.0}
N_EMBED, EMBED_DIM = 64, 4
GUMBEL_DDCONFIG = {**DDCONFIG, "z_channels": EMBED_DIM}  # GumbelVQ projects quant_conv's output: z == embed_dim


class TamingVQGAN(nn.Module):
    """taming.models.vqgan.VQModel without Lightning: taming's modules under the same attribute names."""

    def __init__(self, ddconfig: dict):
        super().__init__()
        self.encoder, self.decoder = Encoder(**ddconfig), Decoder(**ddconfig)
        self.quantize = VectorQuantizer2(N_EMBED, EMBED_DIM, beta=0.25)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], EMBED_DIM, 1)
        self.post_quant_conv = nn.Conv2d(EMBED_DIM, ddconfig["z_channels"], 1)

    def encode(self, x):
        quant, _, (_, _, ids) = self.quantize(self.quant_conv(self.encoder(x)))
        return quant, ids.view(len(x), *quant.shape[2:])

    def decode(self, quant):
        return self.decoder(self.post_quant_conv(quant))


class TamingGumbelVQGAN(TamingVQGAN):
    """taming.models.vqgan.GumbelVQ's modules: codes are the argmax of a 1x1 projection's logits."""

    def __init__(self, ddconfig: dict):
        super().__init__(ddconfig)
        self.quantize = GumbelQuantize(ddconfig["z_channels"], EMBED_DIM, n_embed=N_EMBED)

    def codes(self, x):
        return self.quantize.proj(self.quant_conv(self.encoder(x))).argmax(dim=1)  # (B, h, w): noise-free

    def decode_codes(self, ids):
        return self.decode(self.quantize.get_codebook_entry(ids.reshape(-1), (*ids.shape, EMBED_DIM)))


class LightningCallback:
    """Pickled by reference like Lightning's ModelCheckpoint in a real .ckpt: the loader must not import it."""


@pytest.fixture(scope="module")
def glyphs():
    images, _ = render(OPENMOJI_FONT, [ch for ch, _ in named_emoji(24)], size=32)
    return images


@pytest.fixture(scope="module")
def taming_model(glyphs):
    """Random weights (norms too, so a swapped norm would show); codebook from encoder outputs, so many
    codes are in use."""
    torch.manual_seed(0)
    model = TamingVQGAN(DDCONFIG).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        latents = model.quant_conv(model.encoder(to_unit_range(glyphs)))  # (B, e, 16, 16)
        flat = latents.permute(0, 2, 3, 1).reshape(-1, EMBED_DIM)
        model.quantize.embedding.weight.copy_(flat[torch.randperm(len(flat))[:N_EMBED]])
    return model


def write_taming_run(model: TamingVQGAN, run: Path, ddconfig: dict = DDCONFIG,
                     target: str = "taming.models.vqgan.VQModel") -> Path:
    """As taming's main.py leaves a run: checkpoints/last.ckpt (a Lightning checkpoint dict with the
    discriminator's loss.* weights) and configs/<time>-project.yaml + <time>-lightning.yaml."""
    state = OrderedDict(model.state_dict())
    state["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    state["loss.logvar"] = torch.zeros(())
    (run / "checkpoints").mkdir(parents=True)
    (run / "configs").mkdir()
    torch.save({"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.0.8", "state_dict": state,
                "callbacks": {LightningCallback: {"best_model_score": np.float64(0.25), "monitor": "val/rec_loss"}},
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6}]}], "lr_schedulers": []},
               run / "checkpoints" / "last.ckpt")
    loss = {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator", "params": {"disc_start": 10000}}
    config = {"model": {"base_learning_rate": 4.5e-6, "target": target,
                        "params": {"embed_dim": EMBED_DIM, "n_embed": N_EMBED, "ddconfig": ddconfig,
                                   "lossconfig": loss}},
              "data": {"target": "main.DataModuleFromConfig", "params": {"batch_size": 4}}}
    OmegaConf.save(OmegaConf.create(config), run / "configs" / "2026-11-27T01-00-00-project.yaml")
    OmegaConf.save(OmegaConf.create({"lightning": {"trainer": {"gpus": "0,"}}}),
                   run / "configs" / "2026-11-27T01-00-00-lightning.yaml")
    return run / "checkpoints" / "last.ckpt"


def copy_config_beside(path: Path, checkpoint: Path) -> None:
    """The taming run's config as ``config.yaml`` next to another checkpoint file."""
    project = next((checkpoint.parent.parent / "configs").glob("*-project.yaml"))
    (path.parent / "config.yaml").write_text(project.read_text())


@pytest.fixture(scope="module")
def checkpoint(taming_model, tmp_path_factory):
    return write_taming_run(taming_model, tmp_path_factory.mktemp("taming") / "vqgan_tiny")


def as_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(int)


@torch.no_grad()
def test_converted_vqgan_encodes_and_decodes_like_taming(taming_model, checkpoint, glyphs):
    full = load_pretrained_tokenizer(checkpoint)  # config found in ../configs/*-project.yaml
    vq = full.vq
    x = to_unit_range(glyphs)
    quant, ids = taming_model.encode(x)
    assert len(ids.unique()) > 10  # a check that means something: many codes in play
    _, _, (_, _, diffusers_ids) = vq.quantize(vq.encode(x).latents)
    assert torch.equal(diffusers_ids.view(ids.shape), ids)
    expected = taming_model.decode(quant)
    torch.testing.assert_close(vq.decode(quant, force_not_quantize=True).sample, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(vq(x).sample, expected, atol=1e-4, rtol=1e-4)  # encode -> quantize -> decode
    # The pipeline's Tokenizer over the whole codebook (not remapped yet) gives taming's codes and images.
    assert full.num_codes == N_EMBED and full.code_logits is None
    tokens = full.encode(glyphs)
    assert torch.equal(tokens, ids)
    np.testing.assert_allclose(full.decode(tokens).astype(int), as_uint8(expected), atol=1)


@torch.no_grad()
def test_converted_gumbel_vqgan_picks_taming_codes_by_logits(glyphs, tmp_path):
    torch.manual_seed(1)
    model = TamingGumbelVQGAN(GUMBEL_DDCONFIG).eval()
    latents = model.quant_conv(model.encoder(to_unit_range(glyphs))).permute(0, 2, 3, 1).reshape(-1, EMBED_DIM)
    centres = latents[torch.randperm(len(latents))[:N_EMBED]]  # logits -|h - c|^2 / 2 + const: many codes win
    model.quantize.proj.weight.copy_(centres[:, :, None, None])
    model.quantize.proj.bias.copy_(-0.5 * centres.pow(2).sum(1))
    checkpoint = write_taming_run(model, tmp_path / "gumbel", GUMBEL_DDCONFIG, "taming.models.vqgan.GumbelVQ")
    full = load_pretrained_tokenizer(checkpoint)
    ids = model.codes(to_unit_range(glyphs))
    assert len(ids.unique()) > 10 and full.code_logits is not None
    assert torch.equal(full.encode(glyphs), ids)
    np.testing.assert_allclose(full.decode(ids).astype(int), as_uint8(model.decode_codes(ids)), atol=1)
    # Remapped to the codes in use, saved and reloaded: the same codes, the projection kept beside the VQModel.
    used = np.unique(ids.numpy())
    tokenizer = full.remapped(used)
    np.testing.assert_array_equal(used[tokenizer.encode(glyphs).numpy()], ids.numpy())
    tokenizer.save(tmp_path / "tokenizer")
    assert torch.equal(Tokenizer.load(tmp_path / "tokenizer").encode(glyphs), tokenizer.encode(glyphs))


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    root = tmp_path_factory.mktemp("taming-stage")
    params = {"data": {"datasets": {"openmoji": {"source": "openmoji", "limit": 60}}},
              "tracking": {"experiment": "taming-stage"}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        ingest.main([])
    return root


@torch.no_grad()
def test_tokenizer_stage_uses_a_pretrained_vqgan(ingested, checkpoint, taming_model, monkeypatch):
    monkeypatch.chdir(ingested)
    tokenizer.main([f"tokenizer.pretrained={checkpoint}", "tokenizer.steps=1"])
    images = ImageStore.open(paths.dataset_dir("openmoji"))
    maps = np.load(paths.tokens_file("openmoji"))
    assert maps.shape == (len(images), 16, 16)
    used = np.load(paths.TOKENIZER / "used_codes.npy")
    metrics = json.loads(paths.TOKENIZER_METRICS.read_text())
    assert metrics["codebook_size"] == N_EMBED and metrics["codes_used"] == len(used) <= N_EMBED
    assert len(np.unique(maps[images.rows("train")])) == len(used) and maps.max() < len(used)
    assert "final_loss" not in metrics and 0 < metrics["psnr"] < 60  # nothing trained
    # The token maps are taming's own codes, remapped (the used codes cover every training image's codes).
    _, ids = taming_model.encode(to_unit_range(images[np.arange(8)]))
    np.testing.assert_array_equal(used[maps[:8]], ids.numpy())
    source = json.loads((paths.TOKENIZER / "source.json").read_text())
    assert source == {"pretrained": str(checkpoint), "sha256": content_sha256(checkpoint),
                      "config": str(checkpoint.parent.parent / "configs" / "2026-11-27T01-00-00-project.yaml")}
    # Saved as a diffusers VQModel folder: the pipeline's Tokenizer reloads it, and so does the loader.
    assert torch.equal(Tokenizer.load(paths.TOKENIZER).encode(images[np.arange(8)]), torch.as_tensor(maps[:8]).long())
    assert load_pretrained_tokenizer(paths.TOKENIZER).num_codes == N_EMBED  # every code again, not the used ones


def test_missing_checkpoint_is_one_error_line_and_writes_nothing(ingested, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ingested)
    before = sorted(p.name for p in Path(".").iterdir())
    with pytest.raises(SystemExit) as exit_info:
        tokenizer.main([f"tokenizer.pretrained={tmp_path / 'nothing.ckpt'}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: tokenizer.pretrained: ") and "nothing.ckpt" in err
    assert "no such file" in err
    assert sorted(p.name for p in Path(".").iterdir()) == before


def test_config_is_required_and_must_be_a_vqgan(taming_model, tmp_path):
    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": taming_model.state_dict()}, bare)
    with pytest.raises(FileNotFoundError, match=r"bare.ckpt: no config.yaml beside it and none in "
                                                r".*; set tokenizer.pretrained_config"):
        load_pretrained_tokenizer(bare)
    transformer = write_taming_run(taming_model, tmp_path / "transformer",
                                   target="taming.models.cond_transformer.Net2NetTransformer")
    with pytest.raises(ValueError, match=r"project.yaml: model.target is taming.models.cond_transformer."
                                         r"Net2NetTransformer; expected taming.models.vqgan.VQModel or "
                                         r"taming.models.vqgan.GumbelVQ"):
        load_pretrained_tokenizer(transformer)
    not_taming = tmp_path / "other.yaml"
    not_taming.write_text("model:\n  target: taming.models.vqgan.VQModel\n  params: {n_embed: 4}\n")
    with pytest.raises(ValueError, match=r"other.yaml: model.params lacks ddconfig, embed_dim, ddconfig.ch, "):
        load_pretrained_tokenizer(bare, not_taming)


def test_checkpoint_that_does_not_fit_its_config_names_the_keys(taming_model, tmp_path):
    deeper = {**DDCONFIG, "num_res_blocks": 2}  # the config says 2 resnets per level, the weights have 1
    checkpoint = write_taming_run(taming_model, tmp_path / "mismatch", ddconfig=deeper)
    with pytest.raises(ValueError, match=r"last.ckpt: weights do not fit the architecture of .*project.yaml "
                                         r"\(missing: decoder.up_blocks.0.attentions.2.group_norm.bias"):
        load_pretrained_tokenizer(checkpoint)
    gumbel = write_taming_run(taming_model, tmp_path / "gumbel", target="taming.models.vqgan.GumbelVQ")
    with pytest.raises(ValueError, match=r"weights do not fit .*\(quantize.proj.weight: missing, expected "
                                         r"\(64, 4, 1, 1\) and a bias\)"):
        load_pretrained_tokenizer(gumbel)  # a nearest-neighbour VQGAN's weights under a GumbelVQ config
    wider = {**DDCONFIG, "ch": 64}
    checkpoint = write_taming_run(taming_model, tmp_path / "wider", ddconfig=wider)
    with pytest.raises(ValueError, match=r"weights do not fit .*shape: decoder.conv_in.bias \(64,\) vs \(128,\)"):
        load_pretrained_tokenizer(checkpoint)


@pytest.mark.parametrize("content", ["text", "other_model", "tensor"])
def test_a_file_that_is_not_a_vqgan_checkpoint_is_refused(content, checkpoint, tmp_path):
    path = tmp_path / "model.ckpt"
    copy_config_beside(path, checkpoint)
    if content == "text":
        path.write_text("not a checkpoint\n")
    elif content == "other_model":
        torch.save({"state_dict": nn.Linear(3, 3).state_dict()}, path)
    else:
        torch.save(torch.zeros(3), path)
    expected = ("not readable as a PyTorch checkpoint" if content == "text"
                else "no state_dict with a codebook")
    with pytest.raises(ValueError, match=rf"tokenizer.pretrained: .*model.ckpt: {expected}.*"
                                         r"expected a taming-transformers VQGAN checkpoint") as refused:
        load_pretrained_tokenizer(path)
    assert "\n" not in str(refused.value) and "Re-running" not in str(refused.value)  # not torch's advice


class HyperParameters(dict):
    """A dict subclass (like Lightning's AttributeDict): its items cannot be set on a stand-in object."""


def test_a_checkpoint_that_needs_its_code_to_load_says_how_to_keep_the_weights(taming_model, checkpoint, tmp_path):
    path = tmp_path / "hparams.ckpt"
    copy_config_beside(path, checkpoint)
    torch.save({"state_dict": taming_model.state_dict(), "hyper_parameters": HyperParameters(lr=4.5e-6)}, path)
    with pytest.raises(ValueError, match=r"hparams.ckpt: its pickled objects cannot be read without running code "
                                         r"from the file .*if you trust it, keep only the weights: torch.save"):
        load_pretrained_tokenizer(path)


def test_a_folder_must_be_a_diffusers_vqmodel(tmp_path):
    with pytest.raises(ValueError, match=r"empty: no readable config.json"):
        load_pretrained_tokenizer((tmp_path / "empty").mkdir() or tmp_path / "empty")
    (tmp_path / "kl").mkdir()
    (tmp_path / "kl" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match=r"kl/config.json describes a AutoencoderKL, expected a VQModel"):
        load_pretrained_tokenizer(tmp_path / "kl")
