"""Conditioning variants, the null condition, guidance arithmetic and the size presets."""

from __future__ import annotations

import json

import pytest
import torch

from knn_diffusion.config_fields import ConfigError
from knn_diffusion.models.conditioning import CONDITIONERS, build_conditioner, drop_conditions, null_condition
from knn_diffusion.models.config import ConditioningConfig, ConditioningVariant, list_presets
from knn_diffusion.models.continuous.config import DenoiserConfig, UNetConfig, load_unet_preset
from knn_diffusion.models.continuous.sampler import guided_epsilon
from knn_diffusion.models.continuous.unet import ContinuousDenoiser, count_parameters
from tests.continuous_helpers import micro_config

B, K, D = 4, 3, 16
EXPECTED_TOKENS = {
    ConditioningVariant.tokens: 1 + K,
    ConditioningVariant.self_attention: 1 + K,
    ConditioningVariant.cross_attention_pooled: 1,
    ConditioningVariant.concat_linear: 2,
    ConditioningVariant.no_knn: 1,
}


@pytest.mark.parametrize("variant", list(ConditioningVariant))
def test_variant_token_shapes_and_one_training_step(variant):
    torch.manual_seed(0)
    model = ContinuousDenoiser(micro_config(variant, embed_dim=D, k=K))
    cond = torch.randn(B, 1 + K, D)
    tokens = model.conditioner(cond)
    assert tokens.shape == (B, EXPECTED_TOKENS[variant], 32)

    noisy, target = torch.randn(B, 3, 8, 8), torch.randn(B, 3, 8, 8)
    timesteps = torch.randint(0, 1000, (B,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.conditioner.named_parameters()}
    loss = torch.nn.functional.mse_loss(model(noisy, timesteps, cond), target)
    loss.backward()
    optimizer.step()
    # The step reached the conditioner: its weights moved, so the tokens carry gradient into the U-Net.
    moved = [n for n, p in model.conditioner.named_parameters() if not torch.equal(p, before[n])]
    assert "query_proj.weight" in moved
    if variant.uses_knn:
        assert "knn_proj.weight" in moved


@pytest.mark.parametrize("variant", list(ConditioningVariant))
def test_null_condition_gives_zero_tokens(variant):
    conditioner = build_conditioner(ConditioningConfig(variant=variant, embed_dim=D, k=K), width=32)
    cond = torch.randn(B, 1 + K, D)
    tokens = conditioner(null_condition(cond))
    assert torch.count_nonzero(tokens) == 0  # bias-free: y' = 0 switches cross-attention to a constant


def test_neighbours_change_the_tokens_except_for_no_knn():
    cond = torch.randn(B, 1 + K, D)
    other = cond.clone()
    other[:, 1:] = torch.randn(B, K, D)
    for variant in ConditioningVariant:
        torch.manual_seed(0)
        conditioner = build_conditioner(ConditioningConfig(variant=variant, embed_dim=D, k=K), width=32)
        same = torch.allclose(conditioner(cond), conditioner(other))
        assert same == (not variant.uses_knn), variant


def test_every_variant_has_a_conditioner_that_keeps_what_it_declares():
    """The registry is complete, and each variant's declared needs hold: a fixed-k one refuses another k,
    the others accept any k (0 included); one without kNN is conditioned on k=0 whatever is asked."""
    assert set(CONDITIONERS) == set(ConditioningVariant)
    for variant in ConditioningVariant:
        conditioner = build_conditioner(ConditioningConfig(variant=variant, embed_dim=D, k=K), width=32)
        assert type(conditioner).variant == variant
        assert variant.neighbours(K) == (K if variant.uses_knn else 0)
        if variant.fixed_k:
            with pytest.raises(ValueError, match=f"trained with k={K}"):
                conditioner(torch.randn(B, 1, D))
        else:
            assert conditioner(torch.randn(B, 1, D)).shape[0] == B


def test_tokens_variant_accepts_another_k_at_inference_but_concat_linear_does_not():
    tokens = build_conditioner(ConditioningConfig(variant=ConditioningVariant.tokens, embed_dim=D, k=K), width=32)
    assert tokens(torch.randn(B, 1, D)).shape == (B, 1, 32)  # no kNN at inference (paper Fig. 9)
    concat = build_conditioner(ConditioningConfig(variant=ConditioningVariant.concat_linear, embed_dim=D, k=K),
                               width=32)
    with pytest.raises(ValueError, match="trained with k=3"):
        concat(torch.randn(B, 1 + 5, D))


def test_condition_dropout_nulls_whole_samples_at_the_given_rate():
    cond = torch.randn(2000, 1 + K, D)
    dropped = drop_conditions(cond, 0.25, torch.Generator().manual_seed(0))
    is_null = (dropped == 0).flatten(1).all(dim=1)
    kept_intact = (dropped == cond).flatten(1).all(dim=1)
    assert torch.all(is_null ^ kept_intact)  # each sample is either untouched or entirely null
    assert 0.2 < is_null.float().mean().item() < 0.3
    assert drop_conditions(cond, 0.0) is cond


def test_guidance_one_is_the_conditional_and_zero_the_null_prediction():
    torch.manual_seed(0)
    model = ContinuousDenoiser(micro_config(embed_dim=D, k=K)).eval()
    noisy, cond = torch.randn(B, 3, 8, 8), torch.randn(B, 1 + K, D)
    t = torch.tensor(500)
    with torch.no_grad():
        conditional = model(noisy, t.expand(B), cond)
        unconditional = model(noisy, t.expand(B), null_condition(cond))
        assert not torch.allclose(conditional, unconditional, atol=1e-4)
        assert torch.allclose(guided_epsilon(model, noisy, t, cond, 1.0), conditional, atol=1e-5)
        assert torch.allclose(guided_epsilon(model, noisy, t, cond, 0.0), unconditional, atol=1e-5)
        expected = unconditional + 8.0 * (conditional - unconditional)
        assert torch.allclose(guided_epsilon(model, noisy, t, cond, 8.0), expected, atol=1e-4)


def test_presets_are_listed_and_bad_ones_are_named():
    assert list_presets()[:4] == ["tiny", "35M", "100M", "400M"]
    with pytest.raises(ConfigError, match="'huge'.*expected one of"):
        load_unet_preset("huge", 32)
    with pytest.raises(ConfigError, match="not divisible by 2\\*\\*3"):
        load_unet_preset("400M", 36)


def test_custom_preset_file_and_its_errors(tmp_path):
    path = tmp_path / "unet-x.json"
    path.write_text(json.dumps({"block_out_channels": [32, 32], "attention": [False], "head_channels": 16}))
    with pytest.raises(ConfigError, match="'attention' has 1 entries"):
        load_unet_preset(str(path), 8)
    path.write_text(json.dumps({"block_out_channels": [32, 32], "attentions": [False, True]}))
    with pytest.raises(ConfigError, match="unknown keys \\['attentions'\\]"):
        load_unet_preset(str(path), 8)


@pytest.mark.parametrize("name,millions", [("35M", 35), ("100M", 100), ("400M", 400)])
def test_paper_sizes_within_ten_percent(name, millions):
    config = DenoiserConfig(unet=load_unet_preset(name, 64), conditioning=ConditioningConfig(embed_dim=512, k=10))
    assert abs(count_parameters(config) / 1e6 - millions) <= 0.1 * millions


@pytest.mark.parametrize("name", ["tiny", "35M"])
def test_real_instantiation_matches_the_meta_count(name):
    config = DenoiserConfig(unet=load_unet_preset(name, 32), conditioning=ConditioningConfig(embed_dim=256, k=10))
    model = ContinuousDenoiser(config)
    real = sum(p.numel() for p in model.parameters())
    assert real == count_parameters(config)
    if name == "tiny":
        assert real < 2e6  # several times smaller than the 7.2M model measured at 2.6 s/step on 2 cores
        out = model(torch.randn(2, 3, 32, 32), torch.tensor([1, 999]), torch.randn(2, 11, 256))
        assert out.shape == (2, 3, 32, 32)
    else:
        assert abs(real / 1e6 - 35) <= 3.5


def test_denoiser_config_roundtrips_through_json():
    config = micro_config(ConditioningVariant.self_attention)
    again = DenoiserConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(ConfigError, match="DenoiserConfig"):
        DenoiserConfig.from_dict({"unet": {}, "conditioning": {"variant": "bogus"}})
    assert isinstance(again.unet, UNetConfig)
