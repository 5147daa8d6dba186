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
    hooks = ActivationOffloading(min_bytes=0, offload_cpu=True)
    handed, moved = spied(hooks)
    offloaded_loss, offloaded = gradients(model, ids, hooks)
    assert offloaded_loss == loss
    assert all(torch.equal(offloaded[n], plain[n]) for n in plain)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weights = [t for t in handed if t.untyped_storage().data_ptr() in parameters]
    assert moved and weights  # activations moved; the weights were saved too, and stayed
    assert not any(t.untyped_storage().data_ptr() in parameters for t in moved)
    assert hooks.offloaded <= len(moved)  # a tensor saved twice is copied once


def spied(hooks):
    """(every tensor the hooks are handed, the ones they copy out), filled as the hooks run."""
    handed, moved = [], []
    pack = hooks.pack_hook

    def spy(tensor):
        packed = pack(tensor)
        handed.append(tensor)
        if isinstance(packed, tuple):
            moved.append(tensor)
        return packed
    hooks.pack_hook = spy
    return handed, moved


def test_autocasts_copies_of_the_weights_stay_too():
    """Under bf16 autocast each linear layer saves a bf16 copy of its weight: a weight, not an
    activation. Such copies are handed to the hooks, and none is copied out."""
    model = build_model(preset_config("tiny", 256), seed=0)
    ids = torch.randint(0, 256, (2, 32))
    hooks = ActivationOffloading(min_bytes=0, offload_cpu=True)
    handed, moved = spied(hooks)
    with torch.autocast("cpu", dtype=torch.bfloat16), hooks:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    weights = [p.detach().to(torch.bfloat16) for p in model.parameters() if p.dim() == 2]

    def a_weight(t):
        return t.dtype == torch.bfloat16 and any(
            (t.shape == w.shape and torch.equal(t, w)) or (t.shape == w.t().shape and torch.equal(t, w.t()))
            for w in weights)
    assert sum(map(a_weight, handed)) >= 10  # the copies autocast made of the 15 matrices were saved
    assert moved and not any(map(a_weight, moved))


def test_a_tensor_saved_twice_is_copied_once_and_one_kept_in_place_is_still_checked():
    x = torch.randn(8, requires_grad=True)
    a = x * 2
    hooks = ActivationOffloading(min_bytes=0, offload_cpu=True)
    with hooks:
        b = a * a  # saves `a` twice
    b.sum().backward()
    assert hooks.offloaded == 1 and torch.equal(x.grad, 8 * x.detach())
    with ActivationOffloading():  # kept where it is (on the CPU), then changed in place
        y = x.exp()
    y.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


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
