"""Initial weights depend only on the seed and each parameter's name: not on what ran before, the
process count, or whether ZeRO-3's zero.Init or FSDP2 from the meta device built the model already
sharded."""

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


FSDP_META_INIT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    from accelerate import init_empty_weights
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig
    from utils.model import build_model, initialize_shards
    dist.init_process_group("gloo")
    config = (LlamaConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, tie_word_embeddings=False) if sys.argv[3] == "llama" else
              GPT2Config(vocab_size=257, n_embd=32, n_layer=4, n_head=4, n_positions=64, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0))  # 257: uneven shards; no dropout: steps compare
    with init_empty_weights(include_buffers=False):  # what Plan.model_init_context does under FSDP2 from scratch
        model = build_model(config)
    model.tie_weights()  # as train.py does, outside (inside, a tie makes another meta tensor)
    assert all(p.is_meta for p in model.parameters())
    parameters = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    for layer in model.base_model.h if sys.argv[3] == "gpt2" else model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    initialize_shards(model, 1, torch.device("cpu"))
    local = sum(p.to_local().numel() for p in model.parameters())
    assert local < 0.6 * sum(p.numel() for p in model.parameters())  # this process holds about half
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    ids = torch.arange(16).reshape(2, 8) * 7 % 256  # the same batch on both: averaged, the gradient of one
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(2):  # a step moves every shard, and the second step reads what the first wrote
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    stepped = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    if dist.get_rank() == 0:
        torch.save({"weights": full, "buffers": dict(model.named_buffers()), "stepped": stepped,
                    "parameters": parameters}, sys.argv[2])
    dist.barrier()
    os._exit(0)  # as train.py: gloo's teardown sometimes aborts a finished run ("terminate called ...")
""")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_fsdp2_from_the_meta_device_gives_the_same_weights(name, tmp_path):
    """Built on the meta device, sharded over 2 processes, then each process fills only its shards:
    the very same tensors as one process's build (GPT-2: tied embeddings, a parent's rule over its
    children), and the rotary frequencies (buffers, built for real) kept."""
    out = tmp_path / "fsdp_meta.pt"
    script = tmp_path / "fsdp_meta_init.py"
    script.write_text(FSDP_META_INIT)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29393" if name == "llama" else "29394", str(script), str(ROOT), str(out), name],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(out)
    config = LLAMA if name == "llama" else GPT2Config(vocab_size=257, n_embd=32, n_layer=4, n_head=4, n_positions=64,
                                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    plain = built(config, 1, noise=7)
    assert saved["weights"].keys() == plain.keys()
    assert all(torch.equal(saved["weights"][k], plain[k]) for k in plain)
    model = AutoModelForCausalLM.from_config(config)
    assert all(torch.equal(saved["buffers"][k], b) for k, b in model.named_buffers())
    assert saved["parameters"] == model.num_parameters()
    model.load_state_dict(plain)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    ids = torch.arange(16).reshape(2, 8) * 7 % 256
    for _ in range(2):  # one process, the same two steps
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.allclose(saved["stepped"][k], v, atol=1e-6) for k, v in model.state_dict().items())
