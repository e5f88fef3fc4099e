"""A pretrained taming-transformers VQGAN (Esser et al. 2021) as a diffusers ``VQModel`` in a :class:`Tokenizer`.

The paper tokenizes with a public taming VQGAN (VQ-Diffusion's OpenImages f8 ``GumbelVQ``: 8,192 codes,
2,887 used, 32x32 tokens at 256 px). Its encoder, decoder and codebook are the network diffusers'
``VQModel`` implements, under other names: this module builds the ``VQModel`` from the checkpoint's
``config.yaml`` (``model.params.ddconfig``, ``n_embed``, ``embed_dim``) and renames the Lightning
checkpoint's ``state_dict`` onto it. A ``GumbelVQ`` picks codes by a 1x1 projection's logits rather than
by distance: that layer becomes the tokenizer's ``code_logits``. Nothing from taming is imported, and
the checkpoint is read without running code from it.

Name map (taming -> diffusers), level ``i`` of ``L`` (resolution ``r / 2**i``):
  encoder.down.i.block.j / .attn.j / .downsample  -> encoder.down_blocks.i.resnets.j / .attentions.j / .downsamplers.0
  decoder.up.i.block.j / .attn.j / .upsample      -> decoder.up_blocks.(L-1-i).resnets.j / ... / .upsamplers.0
  {encoder,decoder}.mid.block_1 / attn_1 / block_2 -> *.mid_block.resnets.0 / attentions.0 / resnets.1
  norm_out -> conv_norm_out; resnet nin_shortcut -> conv_shortcut; attention norm/q/k/v/proj_out
  (1x1 convs) -> group_norm/to_q/to_k/to_v/to_out.0 (linear layers: the kernel's 1x1 is squeezed);
  quantize.embed (Gumbel) -> quantize.embedding.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import torch
import yaml
from diffusers import VQModel
from torch import nn

from knn_diffusion.models.discrete.vq import Tokenizer, code_logits_layer, load_code_logits

VQGAN_TARGET = "taming.models.vqgan.VQModel"  # nearest-neighbour quantizer (VectorQuantizer2)
GUMBEL_TARGET = "taming.models.vqgan.GumbelVQ"  # codes from a 1x1 projection's logits (GumbelQuantize)
IGNORED_PREFIXES = ("loss.", "quantize.used")  # the discriminator/LPIPS of training; taming's own remap
RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
DDCONFIG_KEYS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution", "z_channels")
ATTENTION_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
EXPECTED_FILE = ("a taming-transformers VQGAN checkpoint (Lightning .ckpt with a state_dict) "
                 "or a diffusers VQModel folder")


class _Opaque:
    """Stands in for every pickled object that is not a tensor or plain container (Lightning callbacks,
    numpy scalars): torch's weights-only reader builds these instead of importing and running them."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def load_pretrained_tokenizer(path: str | os.PathLike, config: str | os.PathLike = "") -> Tokenizer:
    """Every code of a diffusers VQModel folder, or of a taming VQGAN ``.ckpt`` (+ its config: ``config`` or
    found beside it), not yet remapped."""
    path = Path(path)
    if path.is_dir():
        return Tokenizer.unremapped(_diffusers_folder(path), load_code_logits(path))
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer.pretrained: {path}: no such file or folder (expected {EXPECTED_FILE})")
    config_path = Path(config) if config else find_config(path)
    params = read_vqgan_config(config_path)
    vq = vqmodel_for(params, config_path)
    state = dict(read_state_dict(path))
    code_logits = _gumbel_projection(state, params, path, config_path) if params["target"] == GUMBEL_TARGET else None
    _load_exactly(vq, converted_state_dict(state, params["ddconfig"]), path, config_path)
    return Tokenizer.unremapped(vq.eval(), code_logits)


def _gumbel_projection(state: dict, params: dict, checkpoint: Path, config: Path) -> nn.Conv2d:
    """Takes GumbelQuantize's ``proj`` (latents -> code logits) out of ``state``."""
    projection = {leaf: state.pop(f"quantize.proj.{leaf}", None) for leaf in ("weight", "bias")}
    expected = (params["n_embed"], params["embed_dim"], 1, 1)
    if projection["weight"] is None or projection["bias"] is None or tuple(projection["weight"].shape) != expected:
        found = "missing" if projection["weight"] is None else tuple(projection["weight"].shape)
        raise ValueError(f"tokenizer.pretrained: {checkpoint}: weights do not fit the architecture of {config} "
                         f"(quantize.proj.weight: {found}, expected {expected} and a bias)")
    return code_logits_layer(projection)


def _diffusers_folder(path: Path) -> VQModel:
    try:
        class_name = json.loads((path / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError) as err:
        raise ValueError(f"tokenizer.pretrained: {path}: no readable config.json ({err}); "
                         f"expected {EXPECTED_FILE}") from None
    if class_name != "VQModel":
        raise ValueError(f"tokenizer.pretrained: {path}/config.json describes a {class_name}, expected a VQModel")
    return VQModel.from_pretrained(path, low_cpu_mem_usage=False).eval()


def find_config(checkpoint: Path) -> Path:
    """taming writes ``<run>/checkpoints/last.ckpt`` and ``<run>/configs/<time>-project.yaml``; the released
    models ship ``configs/model.yaml``. A ``config.yaml`` beside the checkpoint is taken first."""
    beside = checkpoint.with_name("config.yaml")
    if beside.is_file():
        return beside
    found = [p for p in sorted((checkpoint.parent.parent / "configs").glob("*.yaml"))
             if not p.name.endswith("-lightning.yaml")]
    if len(found) == 1:
        return found[0]
    listed = f"several: {', '.join(str(p) for p in found)}" if found else "none"
    raise FileNotFoundError(f"tokenizer.pretrained: {checkpoint}: no config.yaml beside it and {listed} in "
                            f"{checkpoint.parent.parent / 'configs'}; set tokenizer.pretrained_config to its YAML file")


def read_vqgan_config(path: Path) -> dict:
    """``model.params`` (+ ``target``) of a taming VQGAN config, checked for what a diffusers VQModel can
    represent."""
    try:
        model = yaml.safe_load(path.read_text())["model"]
        target, params = model["target"], dict(model["params"])
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer.pretrained_config: {path}: file not found") from None
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a taming-transformers model config ({type(err).__name__}: {err}); "
                         "expected model.target and model.params") from None
    if target not in (VQGAN_TARGET, GUMBEL_TARGET):
        raise ValueError(f"{path}: model.target is {target}; expected {VQGAN_TARGET} or {GUMBEL_TARGET} "
                         "(EMA-quantizer and transformer models are not supported)")
    ddconfig = params.get("ddconfig") if isinstance(params.get("ddconfig"), dict) else {}
    missing = [key for key in ("ddconfig", "n_embed", "embed_dim") if key not in params]
    missing += [f"ddconfig.{key}" for key in DDCONFIG_KEYS if key not in ddconfig]
    if missing:
        raise ValueError(f"{path}: model.params lacks {', '.join(missing)}")
    unsupported = {"double_z": True, "tanh_out": True, "give_pre_end": True, "resamp_with_conv": False}
    for key, bad in unsupported.items():
        if ddconfig.get(key, not bad) == bad:
            raise ValueError(f"{path}: ddconfig.{key}={bad} is not supported (diffusers' VQModel has no such variant)")
    if ddconfig["ch_mult"][0] != 1 or ddconfig.get("in_channels", 3) != 3 or ddconfig.get("out_ch", 3) != 3:
        raise ValueError(f"{path}: ddconfig needs ch_mult[0] == 1 and 3 image channels in and out, got "
                         f"ch_mult={list(ddconfig['ch_mult'])}, in_channels={ddconfig.get('in_channels')}, "
                         f"out_ch={ddconfig.get('out_ch')}")
    return params | {"target": target}


def _attention_levels(ddconfig: dict) -> list[bool]:
    """Whether level i (side ``resolution / 2**i``) has self-attention after each resnet."""
    return [ddconfig["resolution"] // 2 ** i in ddconfig["attn_resolutions"] for i in range(len(ddconfig["ch_mult"]))]


def vqmodel_for(params: dict, where: Path) -> VQModel:
    """The diffusers VQModel with the architecture of a taming VQGAN config."""
    dd = params["ddconfig"]
    attention = _attention_levels(dd)
    down = tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attention)
    up = tuple("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in attention[::-1])
    try:
        return VQModel(in_channels=3, out_channels=3, down_block_types=down, up_block_types=up,
                       block_out_channels=tuple(dd["ch"] * m for m in dd["ch_mult"]),
                       layers_per_block=dd["num_res_blocks"], latent_channels=dd["z_channels"],
                       num_vq_embeddings=params["n_embed"], vq_embed_dim=params["embed_dim"],
                       norm_num_groups=32, sample_size=dd["resolution"], mid_block_add_attention=True)
    except (KeyError, TypeError, ValueError) as err:  # channels not in groups of 32, a missing ddconfig key
        raise ValueError(f"{where}: ddconfig does not describe a buildable VQGAN "
                         f"({type(err).__name__}: {err})") from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a Lightning checkpoint, read with torch's weights-only unpickler."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError, OSError):
        unsafe = []  # not a zip checkpoint: the weights-only load below decides
    try:
        with torch.serialization.safe_globals([(_Opaque, name) for name in unsafe]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for foreign bytes; all mean one thing
        detail = " ".join(str(err).split())
        if "WeightsUnpickler error:" in detail:  # keep the cause, not torch's advice to load unsafely
            detail = detail.split("WeightsUnpickler error:", 1)[1].split(" Check the documentation")[0].strip()
        reason = f"{type(err).__name__}: {detail[:200]}"
        if zipfile.is_zipfile(path):  # a torch.save file whose pickled objects need their code to be rebuilt
            raise ValueError(f"tokenizer.pretrained: {path}: its pickled objects cannot be read without running "
                             f"code from the file ({reason}); if you trust it, keep only the weights: "
                             "torch.save({'state_dict': torch.load(path, weights_only=False)['state_dict']}, new_path)"
                             ) from None
        raise ValueError(f"tokenizer.pretrained: {path}: not readable as a PyTorch checkpoint ({reason}); "
                         f"expected {EXPECTED_FILE}") from None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not {"quantize.embedding.weight", "quantize.embed.weight"} & set(state):
        raise ValueError(f"tokenizer.pretrained: {path}: no state_dict with a codebook (quantize.embedding.weight "
                         "or, for a Gumbel VQGAN, quantize.embed.weight); "
                         f"expected {EXPECTED_FILE}")
    return state


def _module_names(ddconfig: dict) -> dict[str, tuple[str, dict | None]]:
    """taming module path -> (diffusers module path, its parameters' renames or None for a plain layer)."""
    levels, blocks, attention = len(ddconfig["ch_mult"]), ddconfig["num_res_blocks"], _attention_levels(ddconfig)
    names = {}
    for part in ("encoder", "decoder"):
        names |= {f"{part}.conv_in": (f"{part}.conv_in", None), f"{part}.conv_out": (f"{part}.conv_out", None),
                  f"{part}.norm_out": (f"{part}.conv_norm_out", None)}
        names[f"{part}.mid.block_1"] = (f"{part}.mid_block.resnets.0", RESNET_PARTS)
        names[f"{part}.mid.attn_1"] = (f"{part}.mid_block.attentions.0", ATTENTION_PARTS)
        names[f"{part}.mid.block_2"] = (f"{part}.mid_block.resnets.1", RESNET_PARTS)
    names |= {layer: (layer, None) for layer in ("quant_conv", "post_quant_conv", "quantize.embedding")}
    names["quantize.embed"] = ("quantize.embedding", None)  # GumbelQuantize's codebook
    for i in range(levels):
        down, up = f"encoder.down_blocks.{i}", f"decoder.up_blocks.{levels - 1 - i}"  # diffusers: order of use
        for j in range(blocks):
            names[f"encoder.down.{i}.block.{j}"] = (f"{down}.resnets.{j}", RESNET_PARTS)
            if attention[i]:
                names[f"encoder.down.{i}.attn.{j}"] = (f"{down}.attentions.{j}", ATTENTION_PARTS)
        for j in range(blocks + 1):
            names[f"decoder.up.{i}.block.{j}"] = (f"{up}.resnets.{j}", RESNET_PARTS)
            if attention[i]:
                names[f"decoder.up.{i}.attn.{j}"] = (f"{up}.attentions.{j}", ATTENTION_PARTS)
        if i < levels - 1:
            names[f"encoder.down.{i}.downsample.conv"] = (f"{down}.downsamplers.0.conv", None)
        if i > 0:
            names[f"decoder.up.{i}.upsample.conv"] = (f"{up}.upsamplers.0.conv", None)
    return names


def converted_state_dict(state: dict[str, torch.Tensor], ddconfig: dict) -> dict[str, torch.Tensor]:
    """taming's parameter names -> diffusers'; keys that fit no module are kept as they are, so the
    exact load that follows names them."""
    names = _module_names(ddconfig)
    converted = {}
    for key, tensor in state.items():
        if key.startswith(IGNORED_PREFIXES):
            continue
        head, _, leaf = key.rpartition(".")  # leaf: weight / bias
        module, _, part = head.rpartition(".")
        if head in names and names[head][1] is None:
            converted[f"{names[head][0]}.{leaf}"] = tensor
        elif module in names and part in (names[module][1] or {}):
            target, parts = names[module]
            projection = parts is ATTENTION_PARTS and part != "norm" and tensor.dim() == 4  # (c, c, 1, 1)
            converted[f"{target}.{parts[part]}.{leaf}"] = tensor[:, :, 0, 0] if projection else tensor
        else:
            converted[key] = tensor
    return converted


def _load_exactly(vq: VQModel, state: dict[str, torch.Tensor], checkpoint: Path, config: Path) -> None:
    expected = vq.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                         for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    problems = [f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong_shape)) if keys]
    if problems:
        raise ValueError(f"tokenizer.pretrained: {checkpoint}: weights do not fit the architecture of {config} "
                         f"({'; '.join(problems)})")
    vq.load_state_dict(state, strict=True)
