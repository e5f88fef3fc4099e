"""The discrete backbone: VQ token maps, the mask + uniform transition and a conditional transformer."""
