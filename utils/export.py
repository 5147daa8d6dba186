"""The final model as a Hugging Face checkpoint that `from_pretrained` loads, written by every process.

Each process writes whole tensors of its own share of the model (contiguous runs of about equal
bytes) to `model-0000r-of-0000P.safetensors`, and the main process adds the index, the config and
the generation config: no process holds more than its share plus the tensor being gathered (FSDP2's
DTensors and ZeRO-3's partitions are made whole one tensor at a time, on every process, as each
needs), and the files are written in parallel. One process writes `model.safetensors`, as
`save_pretrained` does. Tensors keep the dtype training holds them in (config.json records it, with
the architecture); a tied weight is written once, under its first name, and `from_pretrained` ties it
again. A model that transformers holds in another layout than it stores (MoE experts fused) is
reverted as a whole, so rank 0 gathers and writes all of it. The new files appear under temporary
names first; only when every process has written its own are older weight files replaced.
"""

import json
import os
from contextlib import nullcontext

import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import PrefixChange, revert_weight_conversion
from transformers.dynamic_module_utils import custom_object_save

from utils.files import publish, write_atomic
from utils.model import own_class

INDEX = "model.safetensors.index.json"


def save_model(model, output_dir):
    """Write `model` (the unwrapped model: FSDP2, ZeRO-3 or whole on every process) into `output_dir`;
    call on every process. Returns the weight files, in order."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    names, tensors = _saved_tensors(model)
    whole_on_rank_0 = _stored_in_another_layout(model)
    sizes = [getattr(t, "ds_numel", t.numel()) * t.element_size() for t in tensors]  # ZeRO-3: the whole tensor's
    owners = [0] * len(tensors) if whole_on_rank_0 else _shares(sizes, world)
    files = ["model.safetensors"] if world == 1 or whole_on_rank_0 else [
        f"model-{r + 1:05d}-of-{world:05d}.safetensors" for r in range(world)]
    mine = {}
    with torch.no_grad():
        for name, tensor, owner in zip(names, tensors, owners):
            whole = _whole(tensor, keep=owner == rank)  # a collective for sharded tensors: every process, each tensor
            if owner == rank:
                mine[name] = whole
    if whole_on_rank_0 and rank == 0:
        mine = revert_weight_conversion(model, mine)
    if mine:  # a model of fewer tensors than processes leaves some without any
        save_file(mine, os.path.join(output_dir, files[rank] + ".tmp"), metadata={"format": "pt"})
    if distributed:
        torch.distributed.barrier()  # every share written: now the older files may go
    if rank == 0:
        _remove_weights(output_dir)  # another run's files would be loaded instead of, or beside, these
        for name in files:
            if os.path.exists(os.path.join(output_dir, name + ".tmp")):
                publish(os.path.join(output_dir, name + ".tmp"), os.path.join(output_dir, name))
        if len(files) > 1:
            write_atomic(os.path.join(output_dir, INDEX), json.dumps(
                {"metadata": {"total_size": sum(sizes)}, "weight_map": {n: files[o] for n, o in zip(names, owners)}},
                indent=2))
        model.config.architectures = [own_class(model).__name__]  # as save_pretrained records them
        model.config.dtype = next((t.dtype for t in tensors if t.is_floating_point()), model.config.dtype)
        model.config.save_pretrained(output_dir)
        if model.can_generate():
            model.generation_config.save_pretrained(output_dir)
        if getattr(model.config, "auto_map", None):  # a model with its own code: the code goes with it
            custom_object_save(model, output_dir, config=model.config)
    if distributed:
        torch.distributed.barrier()
    return files


def _stored_in_another_layout(model):
    """Whether transformers converts this model's weights between how it holds and how it stores them
    (save_pretrained's revert_weight_conversion, which needs the whole state dict at once)."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:  # built here, not loaded: the model type's own mapping, as save_pretrained finds it
        conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False)
                       if not isinstance(c, PrefixChange)]
    return bool(conversions)


def _saved_tensors(model):
    """(names, tensors) of the state dict in order, a tensor shared by several names (tied weights)
    under its first name only."""
    names, tensors, seen = [], [], set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            names.append(name)
            tensors.append(tensor)
    return names, tensors


def _shares(sizes, world):
    """The process that writes each tensor: contiguous runs of about total / world bytes each."""
    total, owners, done = max(sum(sizes), 1), [], 0
    for size in sizes:
        owners.append(min(world - 1, done * world // total))
        done += size
    return owners


def _whole(tensor, keep):
    """The whole tensor on the CPU where `keep` (else None): gathered across processes if sharded."""
    if isinstance(tensor, DTensor):  # FSDP2: all processes gather it
        if tensor.device.type != tensor.device_mesh.device_type:  # offloaded to the CPU: gathered on the device
            tensor = tensor.to(tensor.device_mesh.device_type)
        whole = tensor.full_tensor()
        return whole.cpu().contiguous() if keep else None
    if hasattr(tensor, "ds_id"):  # ZeRO-3: all processes gather the partition, for one tensor
        import deepspeed

        context = deepspeed.zero.GatheredParameters([tensor])
    else:
        context = nullcontext()
    with context:
        return tensor.detach().to("cpu", copy=True).contiguous() if keep else None


def _remove_weights(output_dir):
    for name in os.listdir(output_dir):
        if (name.startswith("model") and name.endswith(".safetensors")) or name == INDEX or \
                (name.startswith("pytorch_model") and name.endswith(".bin")) or name == "pytorch_model.bin.index.json":
            os.remove(os.path.join(output_dir, name))
