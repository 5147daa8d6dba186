"""The loss in slices (utils/loss.py): transformers' numbers, without the whole batch's fp32 logits."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.loss.loss_utils import ForCausalLMLoss

from utils.loss import IGNORE_INDEX, causal_lm_loss, token_losses

VOCAB = 500


def batch(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 40, VOCAB, generator=generator).to(dtype).requires_grad_()
    labels = torch.randint(0, VOCAB, (3, 40), generator=generator)
    labels[0, :5] = labels[2, 17] = IGNORE_INDEX  # a document's first token under masking
    return logits, labels


@pytest.mark.parametrize("num_items", [None, 77])
@pytest.mark.parametrize("chunk_elements", [None, 7 * VOCAB, VOCAB])  # one slice, slices of 7 positions, of 1
def test_the_sliced_loss_and_its_gradient_are_transformers(num_items, chunk_elements):
    logits, labels = batch()
    expected = ForCausalLMLoss(logits, labels, VOCAB, num_items_in_batch=num_items)
    (want,) = torch.autograd.grad(expected, logits)
    got = causal_lm_loss(logits, labels, VOCAB, num_items_in_batch=num_items, chunk_elements=chunk_elements)
    (grad,) = torch.autograd.grad(got, logits)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(grad, want, atol=1e-7, rtol=1e-5)


def test_evaluation_losses_per_token_match_one_cross_entropy():
    logits, labels = batch()
    whole = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
    sliced = token_losses(logits, labels, chunk_elements=9 * VOCAB)
    assert sliced.dtype == torch.float32 and torch.allclose(sliced, whole, atol=1e-6)
    assert (sliced[labels == IGNORE_INDEX] == 0).all()


class LargestFloat32(TorchDispatchMode):
    """The largest fp32 tensor any operation creates (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32:
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("loss", ["transformers", "sliced"])
def test_no_fp32_copy_of_a_whole_batchs_logits(loss):
    """bf16 logits (as under mixed precision): transformers upcasts all of them at once (and its cross
    entropy keeps an fp32 log-softmax as large); the sliced loss never holds more than a slice in fp32,
    in forward or backward, and evaluation neither."""
    logits, labels = batch(torch.bfloat16)
    with LargestFloat32() as seen:
        if loss == "transformers":
            value = ForCausalLMLoss(logits, labels, VOCAB)
        else:
            value = causal_lm_loss(logits, labels, VOCAB, chunk_elements=8 * VOCAB)
            token_losses(logits.detach(), labels, chunk_elements=8 * VOCAB)
        value.backward()
    if loss == "transformers":
        assert seen.largest >= logits.numel()
    else:
        assert seen.largest <= 8 * VOCAB


def test_models_use_the_sliced_loss():
    from utils.model import build_model
    from transformers import LlamaConfig

    model = build_model(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=2))
    assert model.loss_function is causal_lm_loss


def test_each_slice_is_recomputed_in_backward_not_kept(monkeypatch):
    """A slice's fp32 logits and log-softmax live only while it is computed: forward computes each slice
    once and keeps nothing of it; backward computes each again (checkpointing)."""
    import utils.loss

    calls = []
    original = utils.loss._summed_cross_entropy
    monkeypatch.setattr(utils.loss, "_summed_cross_entropy", lambda *a: calls.append(1) or original(*a))
    logits, labels = batch(torch.bfloat16)
    value = causal_lm_loss(logits, labels, VOCAB, chunk_elements=8 * VOCAB)
    slices = -(-logits.shape[0] * logits.shape[1] // 8)
    assert len(calls) == slices
    value.backward()
    assert len(calls) == 2 * slices


def test_mixed_precision_keeps_the_logits_in_bf16(tmp_path):
    """accelerate's mixed precision wraps the forward so that every output comes back in fp32 (the whole
    batch's logits, copied); train.py takes the wrapper off and autocasts the forward itself: the logits
    stay in bf16 and the loss is the same."""
    import subprocess
    import sys

    from conftest import ROOT

    code = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from accelerate import Accelerator
from transformers import LlamaConfig
from utils.model import build_model
accelerator = Accelerator(mixed_precision="bf16", cpu=True)
model = accelerator.prepare(build_model(LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)))
ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
wrapped = model(input_ids=ids, labels=ids)
accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # as train.py does after prepare
with accelerator.autocast():
    ours = model(input_ids=ids, labels=ids)
print(wrapped.logits.dtype, ours.logits.dtype, wrapped.loss.item() == ours.loss.item())
"""
    done = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["torch.float32", "torch.bfloat16", "True"]
