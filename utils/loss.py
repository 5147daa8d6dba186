"""The causal-LM loss in slices of the batch's positions, so the fp32 logits of a whole batch never exist.

transformers' loss upcasts every logit to fp32 at once (and cross entropy keeps an fp32 log-softmax of
the same size for backward): with a 128k vocabulary at block 4096 that is 2 GiB per sequence, twice
over. Here each slice of at most LOSS_CHUNK_ELEMENTS logits is upcast, reduced to a sum and, in
training, recomputed in backward (activation checkpointing of the slice), so only the model's own
logits stay alive. The numbers are the same: the sum of the slices' sums over the same count.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # labels that are not predicted (padding, a document's first token under masking)
LOSS_CHUNK_ELEMENTS = 1 << 26  # logits upcast at once: 256 MiB in fp32 (512 positions of a 128k vocabulary)


def chunk_rows(vocab_size, chunk_elements=None):
    """Positions per slice: at least one."""
    return max(1, (chunk_elements or LOSS_CHUNK_ELEMENTS) // vocab_size)


def next_token_labels(labels, ignore_index=IGNORE_INDEX):
    """The label of each position: the next token (token t+1 is predicted at t); the last predicts nothing."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _summed_cross_entropy(logits, labels, ignore_index):
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")


def causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=IGNORE_INDEX, shift_labels=None,
                   chunk_elements=None, **kwargs):
    """transformers' ForCausalLMLoss (same arguments, same value), computed slice by slice: set as a
    model's `loss_function` (utils/model.py build_model), the model class untouched."""
    if shift_labels is None:  # token t+1 is predicted at position t
        shift_labels = next_token_labels(labels, ignore_index)
    logits, shift_labels = logits.reshape(-1, vocab_size), shift_labels.reshape(-1).to(logits.device)
    rows = chunk_rows(vocab_size, chunk_elements)
    if len(logits) <= rows:
        total = _summed_cross_entropy(logits, shift_labels, ignore_index)
    else:  # each slice's fp32 logits and log-softmax are recomputed in backward, not kept; split (not indexing):
        total = sum(checkpoint(_summed_cross_entropy, part, targets, ignore_index, use_reentrant=False,  # backward
                               preserve_rng_state=False)
                    for part, targets in zip(logits.split(rows), shift_labels.split(rows)))  # joins slices once
    if num_items_in_batch is None:  # a mean over the predicted tokens, as transformers' default
        return total / (shift_labels != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


@torch.no_grad()
def token_losses(logits, labels, chunk_elements=None):
    """Evaluation: the loss of each position (0 where the label is ignored), [batch, positions] in fp32,
    from logits [batch, positions, vocab] (a view, e.g. logits[:, :-1], is not copied) and their labels,
    upcast a slice of one sequence at a time."""
    rows = chunk_rows(logits.shape[-1], chunk_elements)
    losses = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
    for b in range(logits.shape[0]):
        for i in range(0, logits.shape[1], rows):
            losses[b, i:i + rows] = F.cross_entropy(logits[b, i:i + rows].float(), labels[b, i:i + rows],
                                                    reduction="none")
    return losses
