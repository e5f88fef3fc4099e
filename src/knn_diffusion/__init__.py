"""kNN-Diffusion: text-to-image diffusion trained on images only, conditioned on retrieved neighbours."""
__version__ = "0.1.0"
