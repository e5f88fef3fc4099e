"""What the shared training loop takes from both backbones' params sections (no torch here)."""

from __future__ import annotations

from enum import Enum


class Precision(str, Enum):
    auto = "auto"  # bf16 autocast on a GPU that supports it, else fp16 on a GPU, fp32 on the CPU
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"  # with a gradient scaler
