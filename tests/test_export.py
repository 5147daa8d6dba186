"""The final model written by utils/export.py holds what save_pretrained would write: the same tensors
under the same names, an architecture and dtype in config.json, and no older weight files beside it.
(Several processes, each writing its share: tests/test_distributed.py.)"""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MixtralConfig

from conftest import saved_weights
from utils.export import save_model

CONFIGS = {
    "gpt2": GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2),  # tied embeddings
    "llama": LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, dtype="bfloat16"),
    "mixtral": MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, num_local_experts=2),  # fused experts
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_process_writes_what_save_pretrained_writes(name, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name])
    if name == "llama":
        model = model.to(torch.bfloat16)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    (ours / "model-00001-of-00002.safetensors").write_bytes(b"an earlier run on 2 processes")
    (ours / "model.safetensors.index.json").write_text("{}")
    assert save_model(model, str(ours)) == ["model.safetensors"]
    model.save_pretrained(theirs)
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    mine, reference = load_file(str(ours / "model.safetensors")), load_file(str(theirs / "model.safetensors"))
    assert mine.keys() == reference.keys() and all(torch.equal(mine[k], reference[k]) for k in reference)
    config, expected = (json.loads((d / "config.json").read_text()) for d in (ours, theirs))
    assert (config["architectures"], config["dtype"]) == (expected["architectures"], expected["dtype"])
    reloaded = AutoModelForCausalLM.from_pretrained(ours)
    assert all(torch.equal(p, q) for p, q in zip(reloaded.state_dict().values(), model.state_dict().values()))
    assert saved_weights(ours).keys() == mine.keys()
