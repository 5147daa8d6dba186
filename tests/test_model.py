"""Presets: the GPT-2 family matches its published sizes, and MFU's FLOP count is right for tied
embeddings and learned positions."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from utils.model import GPT2, LLAMA, parameter_count, preset_config, training_flops_per_token

# OpenAI's released checkpoints (vocabulary 50,257, 1,024 positions), as transformers counts them
PUBLISHED_GPT2 = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080,
                  "gpt2-xl": 1_557_611_200}


def on_meta(config):
    with torch.device("meta"):  # shapes only: a 1.5B model without allocating it
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("name", PUBLISHED_GPT2)
def test_gpt2_presets_have_the_published_parameter_counts(name):
    model = on_meta(preset_config(name, vocab_size=50257))
    assert parameter_count(model) == PUBLISHED_GPT2[name]
    assert model.config.tie_word_embeddings and model.config.n_positions == 1024
    assert model.config.resid_pdrop == model.config.embd_pdrop == model.config.attn_pdrop == 0.0


@pytest.mark.parametrize("name, millions", [("tiny", 4.2), ("small", 19.5), ("125m", 134.1), ("350m", 348.7),
                                            ("1b", 1104.2)])
def test_llama_presets_have_the_readme_parameter_counts(name, millions):
    """README, Presets and memory: parameters for a 32k vocabulary."""
    assert parameter_count(on_meta(preset_config(name, vocab_size=32000))) / 1e6 == pytest.approx(millions, abs=0.05)


def test_every_preset_builds_and_long_blocks_get_enough_positions():
    for name in [*LLAMA, *GPT2]:
        config = preset_config(name, vocab_size=4096, block_size=4096)
        assert (getattr(config, "n_positions", None) or config.max_position_embeddings) >= 4096


def test_flops_leave_out_lookups_but_count_a_tied_output_layer():
    seq = 128
    gpt2 = on_meta(preset_config("gpt2", vocab_size=50257))
    wte, wpe = 50257 * 768, 1024 * 768
    # the tied token embedding is the output matmul (counted once); the position table is a lookup
    assert training_flops_per_token(gpt2, seq) == 6 * (PUBLISHED_GPT2["gpt2"] - wpe) + 12 * 12 * 768 * seq
    assert PUBLISHED_GPT2["gpt2"] - wpe > wte  # the output layer is in
    llama = on_meta(preset_config("tiny", vocab_size=4096))
    embed = 4096 * 64  # untied: the input table is a lookup, lm_head a matmul
    assert training_flops_per_token(llama, seq) == 6 * (parameter_count(llama) - embed) + 12 * 2 * 64 * seq
