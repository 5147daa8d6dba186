"""--activation_offloading: the activations a forward pass saves for backward wait in CPU memory.

torch's `save_on_cpu` moves every saved tensor, the weights included (a copy of the model per
micro-batch, over PCIe both ways). These hooks move only activations: a parameter, a view of one (a
linear layer saves its weight transposed) and autocast's low-precision copy of one stay where they
are, and so do tensors too small to be worth a copy, expanded (broadcast) tensors and sparse ones.
A tensor saved several times in one forward pass is copied once. Copies go to pinned memory on the
compute stream (no side stream: they do not overlap with compute), and backward brings each one back
when it needs it. Tensors already on the CPU stay (nothing to offload), so on a CPU-only machine the
hooks change nothing. A tensor kept as it is and then modified in place fails backward, as autograd's
own check would (hooks switch that check off).
"""

import torch

MIN_BYTES = 1 << 20  # smaller saved tensors stay on the device: the copy costs more than it frees


class ActivationOffloading(torch.autograd.graph.saved_tensors_hooks):
    """Use around one forward pass; its backward may run outside. `offload_cpu` (tests) offloads tensors
    that are on the CPU already, into fresh CPU copies, so the rule can be checked without a GPU."""

    def __init__(self, min_bytes=MIN_BYTES, offload_cpu=False):
        self.offloaded = 0  # tensors this object has copied out (a count, for tests)
        copies = {}  # one copy per tensor saved several times

        def pack(tensor):
            if (tensor.device.type == "cpu" and not offload_cpu) or tensor.layout != torch.strided \
                    or tensor.untyped_storage().nbytes() < min_bytes or 0 in tensor.stride() or _is_weight(tensor):
                return _Kept(tensor)
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                   tensor.stride(), tensor._version, tensor.dtype)
            if key not in copies:
                self.offloaded += 1
                copy = torch.empty(tensor.size(), dtype=tensor.dtype,
                                   pin_memory=torch.cuda.is_available() and tensor.device.type == "cuda")
                copy.copy_(tensor, non_blocking=True)
                copies[key] = (tensor.device, copy)
            return copies[key]

        def unpack(packed):
            if isinstance(packed, _Kept):
                return packed.get()
            device, copy = packed
            return copy.to(device, non_blocking=True)

        super().__init__(pack, unpack)


class _Kept:
    """A saved tensor left where it is, with its version, so an in-place change is caught in backward."""

    def __init__(self, tensor):
        self.tensor, self.version = tensor, tensor._version

    def get(self):
        if self.tensor._version != self.version:
            raise RuntimeError("one of the variables needed for gradient computation has been modified by an inplace "
                               f"operation (saved at version {self.version}, now {self.tensor._version})")
        return self.tensor


def _is_weight(tensor):
    """A parameter, a view of one, or autocast's copy of one in another dtype (or a view of that)."""
    for candidate in (tensor, tensor._base):
        if candidate is None:
            continue
        if isinstance(candidate, torch.nn.Parameter):
            return True
        function = candidate.grad_fn
        if function is not None and type(function).__name__ == "ToCopyBackward0" and function.next_functions:
            source = function.next_functions[0][0]
            if isinstance(getattr(source, "variable", None), torch.nn.Parameter):
                return True
    return False
