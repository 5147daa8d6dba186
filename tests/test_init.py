"""Initial weights depend only on the seed and each parameter's name: not on what ran before, the
process count, or whether ZeRO-3's zero.Init built the model already sharded."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from conftest import ROOT
from utils.model import initialize_by_name

LLAMA = LlamaConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    tie_word_embeddings=False)


def built(config, seed, noise):
    torch.manual_seed(noise)  # whatever ran before: other draws, another construction order
    model = AutoModelForCausalLM.from_config(config)
    initialize_by_name(model, seed)
    return model.state_dict()


def test_same_seed_same_weights_whatever_ran_before():
    a, b, other = built(LLAMA, 1, noise=0), built(LLAMA, 1, noise=123), built(LLAMA, 2, noise=0)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], other["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], a["model.layers.1.self_attn.q_proj.weight"])


def test_the_models_own_init_rules_are_kept():
    llama = built(LLAMA, 1, noise=0)
    assert torch.equal(llama["model.norm.weight"], torch.ones(32))
    assert llama["model.layers.0.mlp.up_proj.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    gpt2 = built(GPT2Config(vocab_size=256, n_embd=32, n_layer=4, n_head=4, n_positions=64), 1, noise=0)
    # GPT-2's residual projections are re-initialized by their parent module with std 0.02 / sqrt(2 x layers)
    assert gpt2["transformer.h.0.attn.c_proj.weight"].std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.1)
    assert gpt2["transformer.h.0.attn.c_attn.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.equal(gpt2["transformer.h.0.attn.c_attn.bias"], torch.zeros(96))


ZERO_INIT = textwrap.dedent("""
    import os, sys, torch, deepspeed
    sys.path.insert(0, sys.argv[1])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")
    from transformers import AutoModelForCausalLM, LlamaConfig
    from utils.model import import_model_code, initialize_by_name
    config = LlamaConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, tie_word_embeddings=False)
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    import_model_code(config)  # what train.py's model_init_context does before zero.Init
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = AutoModelForCausalLM.from_config(config)
    assert all(p.numel() == 0 for p in model.parameters())  # sharded away: only placeholders are left
    initialize_by_name(model, 1)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, sys.argv[3])
""")


def test_zero_init_gives_the_same_weights(tmp_path):
    """Under zero.Init the parameters are placeholders while the model is built; the re-init gathers
    one module at a time and must produce the very same tensors as an unsharded build."""
    out = tmp_path / "zero_init.pt"
    result = subprocess.run([sys.executable, "-c", ZERO_INIT, str(ROOT), "29391", str(out)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    sharded, plain = torch.load(out), built(LLAMA, 1, noise=7)
    assert sharded.keys() == plain.keys()
    assert all(torch.equal(sharded[k], plain[k]) for k in plain)
