"""The discrete backbone's transformer: presets, parameter counts, shapes, the null condition."""

from __future__ import annotations

import pytest
import torch

from knn_diffusion.config_fields import ConfigError
from knn_diffusion.models.config import ConditioningConfig, ConditioningVariant, list_presets
from knn_diffusion.models.discrete.config import DiscreteConfig, TransformerConfig, load_transformer_preset
from knn_diffusion.models.discrete.transformer import TokenDenoiser, count_parameters


def test_transformer_presets_are_registered_beside_the_unet_ones():
    assert list_presets("transformer")[:4] == ["tiny", "35M", "100M", "400M"]
    assert list_presets()[:4] == ["tiny", "35M", "100M", "400M"]  # the U-Net family is unchanged
    with pytest.raises(ConfigError, match="expected one of"):
        load_transformer_preset("huge", 16, 8, 8)


@pytest.mark.parametrize("name,expected", [("35M", 35e6), ("100M", 100e6), ("400M", 400e6)])
def test_preset_parameter_counts_match_their_names(name, expected):
    # The paper's setting: 32x32 tokens, 2,887 codes, d=512 CLIP embeddings, k=10.
    config = DiscreteConfig(transformer=load_transformer_preset(name, 2887, 32, 32),
                            conditioning=ConditioningConfig(embed_dim=512, k=10))
    assert count_parameters(config) == pytest.approx(expected, rel=0.10)


def test_tiny_preset_is_a_cpu_model():
    config = DiscreteConfig(transformer=load_transformer_preset("tiny", 256, 8, 8),
                            conditioning=ConditioningConfig(embed_dim=256, k=10))
    assert count_parameters(config) < 3e6


def micro(variant=ConditioningVariant.tokens, k=3) -> DiscreteConfig:
    transformer = TransformerConfig(n_layer=2, n_embd=32, n_head=4, num_codes=11, height=2, width=3)
    return DiscreteConfig(transformer=transformer,
                          conditioning=ConditioningConfig(variant=variant, embed_dim=8, k=k))


@pytest.mark.parametrize("variant", list(ConditioningVariant))
def test_forward_gives_log_probabilities_over_codes_for_every_variant(variant):
    torch.manual_seed(0)
    config = micro(variant, k=0 if variant == ConditioningVariant.no_knn else 3)
    model = TokenDenoiser(config)
    x_n = torch.randint(0, 12, (5, 6))  # codes 0..10 and [MASK] = 11
    cond = torch.randn(5, 1 + config.conditioning.k, 8)
    out = model(x_n, torch.randint(1, 100, (5,)), cond)
    assert out.shape == (5, 11, 6)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(5, 6))


def test_null_condition_output_does_not_depend_on_the_number_of_neighbours():
    """Zero tokens give zero keys and values, so how many of them there are cannot matter."""
    torch.manual_seed(0)
    model = TokenDenoiser(micro()).eval()
    x_n, n = torch.randint(0, 12, (2, 6)), torch.tensor([3, 50])
    few, many = model(x_n, n, torch.zeros(2, 2, 8)), model(x_n, n, torch.zeros(2, 11, 8))
    torch.testing.assert_close(few, many)
    assert not torch.allclose(few, model(x_n, n, torch.randn(2, 4, 8)))
