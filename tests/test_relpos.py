"""SAM_ATTENTION=flex: SAM's rel-pos attention through FlexAttention equals transformers' SDPA path.

On the CPU FlexAttention runs eagerly (its reference path), so this checks the indexing of the
decomposed relative positions, not the compiled kernel's speed (``bench/attention.py`` on a GPU).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image
from transformers import SamModel, SamVisionConfig
from transformers.models.sam.modeling_sam import SamVisionSdpaAttention

from backend.engine.relpos import flex_forward, install_relpos_attention


@pytest.fixture(autouse=True)
def quiet_flex():
    with warnings.catch_warnings():  # eager FlexAttention warns that it is not the fast path
        warnings.simplefilter("ignore", UserWarning)
        yield


def _attention(window: int, heads: int = 2, head_dim: int = 80, grid: int = 6) -> SamVisionSdpaAttention:
    config = SamVisionConfig(hidden_size=heads * head_dim, num_attention_heads=heads, image_size=grid * 16,
                             patch_size=16, use_rel_pos=True)
    attention = SamVisionSdpaAttention(config, window).eval()
    generator = torch.Generator().manual_seed(window)
    with torch.no_grad():  # zero-initialized: random positions make a wrong index visible
        attention.rel_pos_h.copy_(torch.randn(attention.rel_pos_h.shape, generator=generator))
        attention.rel_pos_w.copy_(torch.randn(attention.rel_pos_w.shape, generator=generator))
    return attention


@pytest.mark.parametrize("window, tokens", [(0, (6, 6)), (3, (3, 3))])  # global grid, one window
def test_flex_attention_equals_the_sdpa_path_with_its_dense_bias(window, tokens):
    attention = _attention(window)
    hidden = torch.randn(2, *tokens, attention.qkv.in_features, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference, _ = attention(hidden)
        output, weights = flex_forward(attention, hidden)
    assert weights is None and output.shape == reference.shape
    torch.testing.assert_close(output, reference, rtol=1e-5, atol=1e-5)


def test_install_switches_every_rel_pos_layer_of_a_sam_encoder(tiny_settings):
    model = SamModel.from_pretrained(tiny_settings.sam_model, attn_implementation="sdpa").eval()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # the tiny checkpoint's weights are ~0: give the encoder a real signal
        for parameter in model.vision_encoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    size = model.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        # the last layer's tokens (the tiny model's neck scales its output to ~1e-21)
        reference = model.vision_encoder(pixels, output_hidden_states=True).hidden_states[-1]
        layers = sum(isinstance(m, SamVisionSdpaAttention) for m in model.modules())
        assert install_relpos_attention(model, "sdpa") == 0  # its rel-pos coordinates built on the device
        assert torch.equal(model.vision_encoder(pixels, output_hidden_states=True).hidden_states[-1], reference)
        assert install_relpos_attention(model, "flex") == layers > 0
        output = model.vision_encoder(pixels, output_hidden_states=True).hidden_states[-1]
    assert reference.abs().max() > 1e-3  # a real signal, not an all-zero encoder
    torch.testing.assert_close(output, reference, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="SAM_ATTENTION"):
        install_relpos_attention(model, "flash")


def test_the_setting_reaches_the_segmenter(tiny_env):
    from backend.engine.engine import Engine
    from backend.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match="SAM_ATTENTION"):
        Settings.from_env({**tiny_env, "SAM_ATTENTION": "flash"})
    assert Settings.from_env(tiny_env).sam_attention == "sdpa"
    engine = Engine.from_settings(Settings.from_env({**tiny_env, "SAM_ATTENTION": "Flex"}))  # case-insensitive
    assert engine.segmenter.relpos_layers > 0
    result = engine.run([Image.new("RGB", (64, 48), "white")], [["cat"]])[0]
    assert (result.width, result.height) == (64, 48) and len(result.masks) == len(result.detections.boxes)
