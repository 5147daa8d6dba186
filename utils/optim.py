"""AdamW with decoupled weight decay on matrices only, and a warmup + decay schedule."""

import inspect
import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def parameter_groups(model, weight_decay):
    """Decay 2-D weight matrices; leave norms, biases and embeddings undecayed.

    The shape is the parameter's real one: under ZeRO-3's zero.Init every parameter's data is an
    empty 1-D placeholder and DeepSpeed keeps the shape in `ds_shape`."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            matrix = len(getattr(param, "ds_shape", param.shape)) >= 2
            (decay if matrix and id(param) not in embeddings else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def regroup_parameters(optimizer, model):
    """Point the optimizer's groups at `model`'s parameters again. accelerate's FSDP2 prepare swaps in
    the sharded parameters matched by storage address, which a model built on the meta device does
    not have (every address is 0): the groups are rebuilt by the same rule, before any step."""
    groups = parameter_groups(model, 0.0)
    for group, fresh in zip(optimizer.param_groups, groups, strict=True):
        group["params"] = fresh["params"]


def build_optimizer(model, lr, weight_decay, betas):
    # fused kernels on GPU, else foreach (one multi-tensor launch per group instead of one per tensor)
    fused = torch.cuda.is_available() and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=betas, fused=fused or None,
                             foreach=None if fused else True)


def lr_multiplier(step, scheduler_type, warmup_steps, total_steps, min_lr_ratio):
    """Fraction of the peak learning rate at optimizer step `step` (0-based)."""
    if scheduler_type == "constant":  # no warmup, as in transformers; constant_with_warmup has one
        return 1.0
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if scheduler_type == "constant_with_warmup":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if scheduler_type == "linear":
        return 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, scheduler_type, warmup_steps, total_steps, min_lr_ratio):
    """Stepped by train.py exactly once per optimizer step, whatever the number of processes.

    It is built on the optimizer accelerate returns (so it drives DeepSpeed's too) and is not
    passed to `accelerator.prepare`, whose wrapper steps it once per process.
    """
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, scheduler_type, warmup_steps, total_steps, min_lr_ratio))
