"""--activation_offloading: the activations a forward pass saves for backward wait in CPU memory.

torch's `save_on_cpu` moves every saved tensor, the weights included (a copy of the model per
micro-batch, over PCIe both ways). These hooks move only activations: a parameter, or a view of one
(a linear layer saves its weight transposed), stays where it is, and so do tensors too small to be
worth a copy. Copies go to pinned memory without blocking, so they overlap with the compute that
follows; backward brings each one back when it needs it. Tensors already on the CPU stay (nothing to
offload), so on a CPU-only machine the hooks change nothing.
"""

import torch

MIN_BYTES = 1 << 20  # smaller saved tensors stay on the device: the copy costs more than it frees


class ActivationOffloading(torch.autograd.graph.saved_tensors_hooks):
    """Use around a forward pass; its backward may run outside. `offload_cpu` (tests) offloads tensors
    that are on the CPU already, into fresh CPU copies, so the rule can be checked without a GPU."""

    def __init__(self, min_bytes=MIN_BYTES, offload_cpu=False):
        self.offloaded = 0  # tensors moved by the last forward pass under these hooks (a count, for tests)

        def pack(tensor):
            if (tensor.device.type == "cpu" and not offload_cpu) or _is_parameter(tensor) \
                    or tensor.numel() * tensor.element_size() < min_bytes:
                return tensor
            self.offloaded += 1
            copy = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout,
                               pin_memory=torch.cuda.is_available() and tensor.device.type == "cuda")
            copy.copy_(tensor, non_blocking=True)
            return tensor.device, copy

        def unpack(packed):
            if isinstance(packed, tuple):
                device, copy = packed
                return copy.to(device, non_blocking=True)
            return packed

        super().__init__(pack, unpack)


def _is_parameter(tensor):
    """A parameter, or a view of one (its `_base`)."""
    return isinstance(tensor, torch.nn.Parameter) or isinstance(getattr(tensor, "_base", None), torch.nn.Parameter)
