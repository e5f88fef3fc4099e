"""Loading a taming-transformers VQGAN checkpoint as a diffusers VQModel (``tokenizer.pretrained``): time and agreement.

No VQGAN weights can be downloaded here, so two architectures are built from taming's own modules with
random weights: ``f16_16384`` (taming's ``vqgan_imagenet_f16_16384``: ch 128, ch_mult 1,1,2,2,4, attention at
side 16, 16,384 codes of 256 dims; nearest-neighbour quantizer) and ``gumbel_f8_8192`` (a ``GumbelVQ`` of the
paper's token shape: f8, 32x32 tokens at 256 px, 8,192 codes; attention at side 32). Codes are spread around
random encoder outputs so that many are chosen. Each is saved the way taming's main.py leaves a run
(Lightning checkpoint with ``loss.*`` discriminator keys, ``configs/*.yaml``) and loaded with the stage's
loader. Prints JSON per architecture: checkpoint size, load + conversion time, how many codes equal taming's
(Gumbel: the noise-free argmax of its logits), the largest difference of decoded pixels, and encode/decode
throughput at 256 px of both implementations. Random weights say nothing about reconstruction quality.

    OMP_NUM_THREADS=2 python benchmarks/bench_taming.py --images 2"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch
from omegaconf import OmegaConf
from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.vqvae.quantize import GumbelQuantize, VectorQuantizer2
from torch import nn

from knn_diffusion.models.discrete.taming import load_pretrained_tokenizer
from knn_diffusion.models.discrete.vq import to_uint8, to_unit_range

from timing import clock  # benchmarks/timing.py, beside this script

ARCHITECTURES = {  # name: (taming target, ddconfig, n_embed, embed_dim)
    "f16_16384": ("taming.models.vqgan.VQModel",
                  {"double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                   "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16], "dropout": 0.0},
                  16384, 256),
    "gumbel_f8_8192": ("taming.models.vqgan.GumbelVQ",
                       {"double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3, "out_ch": 3,
                        "ch": 128, "ch_mult": [1, 1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [32],
                        "dropout": 0.0},
                       8192, 256),
}


class TamingVQGAN(nn.Module):
    """taming's VQModel / GumbelVQ without Lightning: taming's modules under the same attribute names."""

    def __init__(self, target: str, ddconfig: dict, n_embed: int, embed_dim: int):
        super().__init__()
        self.gumbel = target.endswith("GumbelVQ")
        self.encoder, self.decoder = Encoder(**ddconfig), Decoder(**ddconfig)
        self.quantize = (GumbelQuantize(ddconfig["z_channels"], embed_dim, n_embed=n_embed) if self.gumbel
                         else VectorQuantizer2(n_embed, embed_dim, beta=0.25))
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def spread_codes(self, centres: torch.Tensor) -> None:
        """Codes around ``centres`` (n_embed, e) so that many are chosen: the codebook itself, or for Gumbel
        logits -|h - c|^2 / 2 + const."""
        if self.gumbel:
            self.quantize.proj.weight.copy_(centres[:, :, None, None])
            self.quantize.proj.bias.copy_(-0.5 * centres.pow(2).sum(1))
        else:
            self.quantize.embedding.weight.copy_(centres)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        h = self.quant_conv(self.encoder(x))  # (B, e, h, w)
        if self.gumbel:
            return self.quantize.proj(h).argmax(dim=1)  # the noise-free choice
        return self.quantize(h)[2][2].view(len(x), *h.shape[2:])

    def decode_codes(self, ids: torch.Tensor) -> torch.Tensor:
        codebook = self.quantize.embed.weight if self.gumbel else self.quantize.embedding.weight
        return self.decoder(self.post_quant_conv(codebook[ids].permute(0, 3, 1, 2)))


def smooth_images(count: int, seed: int) -> torch.Tensor:
    """(B, 3, 256, 256) in [-1, 1]: coarse random colour fields, upsampled."""
    coarse = torch.rand(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return nn.functional.interpolate(coarse, size=256, mode="bicubic", align_corners=False).clamp(0, 1) * 2 - 1


@torch.no_grad()
def bench(name: str, images: int, seed: int) -> dict:
    target, ddconfig, n_embed, embed_dim = ARCHITECTURES[name]
    torch.manual_seed(seed)
    pixels = to_uint8(smooth_images(images, seed))  # (B, 256, 256, 3)
    x = to_unit_range(pixels)
    taming, build_s = clock(lambda: TamingVQGAN(target, ddconfig, n_embed, embed_dim).eval())
    latents = taming.quant_conv(taming.encoder(smooth_images(8, seed + 1)))  # codes around encoder outputs
    flat = latents.permute(0, 2, 3, 1).reshape(-1, embed_dim)
    picked = flat[torch.randint(0, len(flat), (n_embed,))]  # fewer vectors than codes: noise parts twins
    taming.spread_codes(picked + 0.5 * flat.std(0) * torch.randn_like(picked))
    report = {"architecture": f"{name} ({target}, random weights)", "threads": torch.get_num_threads(),
              "generator_params_M": round(sum(p.numel() for p in taming.parameters()) / 1e6, 1),
              "build_s": round(build_s, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / name
        (run / "checkpoints").mkdir(parents=True)
        (run / "configs").mkdir()
        state = OrderedDict(taming.state_dict())
        state["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
        checkpoint = run / "checkpoints" / "last.ckpt"
        torch.save({"epoch": 0, "global_step": 0, "state_dict": state}, checkpoint)
        OmegaConf.save(OmegaConf.create({"model": {"target": target, "params": {
            "embed_dim": embed_dim, "n_embed": n_embed, "ddconfig": ddconfig}}}), run / "configs" / "model.yaml")
        report["checkpoint_MB"] = round(checkpoint.stat().st_size / 2**20, 1)
        full, load_s = clock(lambda: load_pretrained_tokenizer(checkpoint))
    ids, taming_encode_s = clock(lambda: taming.codes(x))
    expected, taming_decode_s = clock(lambda: taming.decode_codes(ids))
    tokens, encode_s = clock(lambda: full.encode(pixels))
    quant = full.vq.quantize.embedding(ids).permute(0, 3, 1, 2)  # the codes' vectors, (B, e, h, w)
    decoded, decode_s = clock(lambda: full.vq.decode(quant, force_not_quantize=True).sample)
    report |= {"load_and_convert_s": round(load_s, 2), "images": images, "token_map": list(ids.shape[1:]),
               "codes_in_use": int(ids.unique().numel()),
               "codes_equal": f"{int((tokens == ids).sum())} of {ids.numel()}",
               "decode_max_abs_diff": float((decoded - expected).abs().max()),
               "encode_images_per_s": {"converted": round(images / encode_s, 3),
                                       "taming": round(images / taming_encode_s, 3)},
               "decode_images_per_s": {"converted": round(images / decode_s, 3),
                                       "taming": round(images / taming_decode_s, 3)}}
    return report


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--architectures", nargs="+", choices=sorted(ARCHITECTURES), default=sorted(ARCHITECTURES))
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    reports = [bench(name, args.images, args.seed) for name in args.architectures]
    print(json.dumps(reports, indent=2))
    return reports


if __name__ == "__main__":
    main()
