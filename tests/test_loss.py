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
