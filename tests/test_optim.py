"""Learning-rate schedules and AdamW parameter groups."""


import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from utils.optim import build_optimizer, build_scheduler, lr_multiplier, parameter_groups


def tiny_llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=32))


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = tiny_llama()
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "model.embed_tokens.weight" not in decayed
    assert not any("norm" in n for n in decayed)
    assert "lm_head.weight" in decayed and "model.layers.0.self_attn.q_proj.weight" in decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_zero3_placeholders_keep_their_weight_decay():
    """zero.Init swaps each parameter's data for an empty 1-D tensor and keeps the shape in ds_shape:
    the grouping must read the real shape, or every matrix silently loses its weight decay."""
    model = tiny_llama()
    expected = [[id(p) for p in group["params"]] for group in parameter_groups(model, 0.1)]
    for param in model.parameters():
        param.ds_shape = param.shape
        param.data = torch.empty(0)
    assert [[id(p) for p in group["params"]] for group in parameter_groups(model, 0.1)] == expected
    assert len(expected[0]) > 0


def test_constant_schedule_has_no_warmup():
    assert [lr_multiplier(s, "constant", 4, 20, 0.1) for s in range(6)] == [1.0] * 6


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant_with_warmup"])
def test_warmup_rises_to_peak_then_schedule(kind):
    lrs = [lr_multiplier(s, kind, warmup_steps=4, total_steps=20, min_lr_ratio=0.1) for s in range(20)]
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    tail = lrs[4:]
    if kind.startswith("constant"):
        assert tail == [1.0] * len(tail)
    else:
        assert all(a >= b for a, b in zip(tail, tail[1:]))
        end = lr_multiplier(20, kind, 4, 20, 0.1)
        assert end == pytest.approx(0.0 if kind == "linear" else 0.1)


def test_scheduler_steps_once_per_call():
    model = tiny_llama()
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    scheduler = build_scheduler(optimizer, "linear", warmup_steps=2, total_steps=10, min_lr_ratio=0.0)
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2, 1e-2 * 7 / 8])
    assert isinstance(optimizer, torch.optim.AdamW)
