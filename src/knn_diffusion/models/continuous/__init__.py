"""The continuous backbone: a pixel-space U-Net DDPM conditioned on kNN embeddings."""
