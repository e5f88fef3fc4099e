"""Loading a taming-transformers VQGAN checkpoint as a diffusers VQModel (``tokenizer.pretrained``): time and agreement.

No VQGAN weights can be downloaded here, so the paper's tokenizer architecture (``vqgan_imagenet_f16_16384``:
ch 128, ch_mult 1,1,2,2,4, two resnets per level, attention at side 16 and in the middle, 16,384 codes of
256 dims) is built from taming's own modules with random weights (codebook: random encoder outputs, so codes
vary), saved the way taming's main.py leaves a run (Lightning checkpoint with ``loss.*`` discriminator keys,
``configs/*-project.yaml``), and loaded with the stage's loader. Prints JSON: checkpoint size, load +
conversion time, the share of codes equal to taming's, the largest difference of decoded pixels, and
encode/decode throughput at 256 px for both implementations. Random weights say nothing about
reconstruction quality.

    OMP_NUM_THREADS=2 python benchmarks/bench_taming.py --images 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch
from omegaconf import OmegaConf
from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.vqvae.quantize import VectorQuantizer2
from torch import nn

from knn_diffusion.models.discrete.taming import load_pretrained_vq

F16_16384 = {"double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
             "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16], "dropout": 0.0}
N_EMBED, EMBED_DIM = 16384, 256


class TamingVQGAN(nn.Module):
    """taming.models.vqgan.VQModel without Lightning: taming's modules under the same attribute names."""

    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = Encoder(**F16_16384), Decoder(**F16_16384)
        self.quantize = VectorQuantizer2(N_EMBED, EMBED_DIM, beta=0.25)
        self.quant_conv = nn.Conv2d(F16_16384["z_channels"], EMBED_DIM, 1)
        self.post_quant_conv = nn.Conv2d(EMBED_DIM, F16_16384["z_channels"], 1)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def smooth_images(count: int, seed: int) -> torch.Tensor:
    """(B, 3, 256, 256) in [-1, 1]: coarse random colour fields, upsampled."""
    coarse = torch.rand(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return nn.functional.interpolate(coarse, size=256, mode="bicubic", align_corners=False).clamp(0, 1) * 2 - 1


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    x = smooth_images(args.images, args.seed)
    taming, build_s = timed(lambda: TamingVQGAN().eval())
    latents = taming.quant_conv(taming.encoder(smooth_images(8, args.seed + 1)))  # codebook <- encoder outputs
    flat = latents.permute(0, 2, 3, 1).reshape(-1, EMBED_DIM)
    picked = flat[torch.randint(0, len(flat), (N_EMBED,))]  # 2,048 vectors for 16,384 codes: noise parts twins
    taming.quantize.embedding.weight.copy_(picked + 0.5 * flat.std(0) * torch.randn_like(picked))
    report = {"architecture": "vqgan_imagenet_f16_16384 (random weights)", "threads": torch.get_num_threads(),
              "generator_params_M": round(sum(p.numel() for p in taming.parameters()) / 1e6, 1),
              "build_s": round(build_s, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "vqgan_imagenet_f16_16384"
        (run / "checkpoints").mkdir(parents=True)
        (run / "configs").mkdir()
        state = OrderedDict(taming.state_dict())
        state["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
        checkpoint = run / "checkpoints" / "last.ckpt"
        torch.save({"epoch": 0, "global_step": 0, "state_dict": state}, checkpoint)
        OmegaConf.save(OmegaConf.create({"model": {"target": "taming.models.vqgan.VQModel", "params": {
            "embed_dim": EMBED_DIM, "n_embed": N_EMBED, "ddconfig": F16_16384}}}), run / "configs" / "model.yaml")
        report["checkpoint_MB"] = round(checkpoint.stat().st_size / 2**20, 1)
        vq, report["load_and_convert_s"] = timed(lambda: load_pretrained_vq(checkpoint))
    (quant, _, (_, _, ids)), taming_encode_s = timed(lambda: taming.quantize(taming.quant_conv(taming.encoder(x))))
    expected, taming_decode_s = timed(lambda: taming.decoder(taming.post_quant_conv(quant)))
    (_, _, (_, _, converted_ids)), encode_s = timed(lambda: vq.quantize(vq.encode(x).latents))
    decoded, decode_s = timed(lambda: vq.decode(quant, force_not_quantize=True).sample)
    report |= {"images": args.images, "token_map": list(quant.shape[2:]), "codes_in_use": int(ids.unique().numel()),
               "codes_equal": float((converted_ids.view(-1) == ids.view(-1)).float().mean()),
               "decode_max_abs_diff": float((decoded - expected).abs().max()),
               "encode_images_per_s": {"diffusers": round(args.images / encode_s, 3),
                                       "taming": round(args.images / taming_encode_s, 3)},
               "decode_images_per_s": {"diffusers": round(args.images / decode_s, 3),
                                       "taming": round(args.images / taming_decode_s, 3)}}
    report["load_and_convert_s"] = round(report["load_and_convert_s"], 2)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
