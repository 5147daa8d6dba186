"""--activation_offloading: activations saved for backward move to CPU memory and back, the weights stay,
and training computes the same numbers."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY, launch, train_losses
from utils.model import build_model, preset_config
from utils.offload import ActivationOffloading


def gradients(model, ids, hooks=None):
    model.zero_grad()
    if hooks is None:
        loss = model(input_ids=ids, labels=ids).loss
    else:
        with hooks:
            loss = model(input_ids=ids, labels=ids).loss
    loss.backward()  # outside the hooks: backward brings the copies back
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_offloaded_activations_give_the_same_gradients_and_leave_the_weights(checkpointing, monkeypatch):
    """Every saved tensor that is no parameter (nor a view of one) is copied out and back (on this
    CPU-only machine into fresh CPU tensors: offload_cpu); the gradients are those of a plain backward."""
    torch.manual_seed(0)
    model = build_model(preset_config("tiny", 256), seed=0, gradient_checkpointing=checkpointing)
    model.train()
    ids = torch.randint(0, 256, (2, 32))
    loss, plain = gradients(model, ids)
    packed = []
    hooks = ActivationOffloading(min_bytes=0, offload_cpu=True)
    original_pack = hooks.pack_hook

    def spy(tensor):
        packed.append(tensor)
        return original_pack(tensor)
    hooks.pack_hook = spy
    offloaded_loss, offloaded = gradients(model, ids, hooks)
    assert offloaded_loss == loss
    assert all(torch.equal(offloaded[n], plain[n]) for n in plain)
    assert hooks.offloaded > 0
    parameters = {p.data_ptr() for p in model.parameters()}
    moved = [t for t in packed if t.untyped_storage().data_ptr() not in parameters]
    assert hooks.offloaded == len(moved)  # only what is no weight moved
    assert len(moved) < len(packed)  # the weights were saved too, and stayed


def test_on_the_cpu_nothing_is_offloaded():
    model = AutoModelForCausalLM.from_config(preset_config("tiny", 256))
    hooks = ActivationOffloading(min_bytes=0)
    gradients(model, torch.randint(0, 256, (1, 16)), hooks)
    assert hooks.offloaded == 0


def test_training_with_activation_offloading_runs_the_same_steps(tmp_path, corpus):
    out, plain = tmp_path / "offloaded", tmp_path / "plain"
    args = ["--train_file", corpus, *TINY, "--max_train_steps", 4, "--gradient_checkpointing"]
    launch([*args, "--output_dir", plain])
    launch([*args, "--output_dir", out, "--activation_offloading"])
    assert train_losses(out) == train_losses(plain)
