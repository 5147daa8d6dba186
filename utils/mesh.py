"""The model axis: HSDP, tensor and context parallelism from the accelerate config's `parallelism_config:`.

accelerate builds the device mesh (dp_replicate x dp_shard x cp x tp, tp innermost so a tensor-parallel
group is GPUs of one node) and shards with FSDP2 over the data-parallel dimensions; its loaders give
every process of one tp/cp group the same batch. This module reads the sizes before any work, refuses
the layouts that would fail late or train wrong, says how a step's numbers count on the mesh, and
applies the model's tensor-parallel plan (transformers') from outside, the model class untouched.
"""

import contextlib
from dataclasses import dataclass

import torch

from utils.errors import UserError
from utils.loss import next_token_labels

_SIZES = ("dp_replicate", "dp_shard", "tp", "cp")


@dataclass(frozen=True)
class Mesh:
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    cp: int = 1
    configured: bool = False  # the accelerate config has a parallelism_config

    @classmethod
    def from_env(cls, env, world_size):
        """The sizes `accelerate launch` hands the script (PARALLELISM_CONFIG_*), or plain data parallelism."""
        if env.get("ACCELERATE_USE_PARALLELISM_CONFIG", "false").lower() != "true":
            return cls(dp_shard=world_size)
        sizes = {name: int(env.get(f"PARALLELISM_CONFIG_{name.upper()}_SIZE", 1)) for name in (*_SIZES, "sp")}
        if sizes.pop("sp") > 1:
            raise UserError("parallelism_config_sp_size is DeepSpeed's sequence parallelism, which this script does "
                            "not build: use parallelism_config_cp_size (context parallelism) with FSDP2")
        mesh = cls(**sizes, configured=True)
        if mesh.size == 1 and world_size > 1:  # as accelerate reads it: every process a replica (check refuses it)
            return cls(dp_replicate=world_size, configured=True)
        return mesh

    @property
    def size(self):
        return self.dp_replicate * self.dp_shard * self.tp * self.cp

    @property
    def data_parallel(self):
        """Processes that each train on their own sequences: a step's batch counts these, not processes."""
        return self.dp_replicate * self.dp_shard

    @property
    def gradient_average(self):
        """The processes FSDP2 (or DDP) averages gradients over: data parallel x context parallel
        (each cp rank holds a part of every sequence); tensor-parallel ranks are not averaged."""
        return self.data_parallel * self.cp

    @property
    def batch_copies(self):
        """Processes the loader gives each batch: the tensor- and context-parallel ranks of one data-parallel
        rank. A sum over all processes of a count taken from the batches counts it this many times."""
        return self.tp * self.cp

    @property
    def loss_copies(self):
        """Processes that compute the same share of the loss: the tensor-parallel ranks (each context-parallel
        rank computes the loss of its own part of the sequences)."""
        return self.tp

    def data_rank(self, process_index):
        """This process's data-parallel rank: tp and cp are the mesh's innermost dimensions (accelerate)."""
        return process_index // (self.tp * self.cp)

    def describe(self):
        return f" | mesh {layout(self.record())}" if self.configured else ""

    def record(self):
        """The sizes, for results.json and checkpoints; None without a parallelism_config."""
        return {name: getattr(self, name) for name in _SIZES} if self.configured else None

    def check(self, world_size, fsdp, cuda, args):
        """Every layout that would fail deep in a library or train wrong, in one line, before any work."""
        if not self.configured:
            return
        sizes = " x ".join(f"{name} {getattr(self, name)}" for name in _SIZES)
        if self.size != world_size:
            raise UserError(f"parallelism_config {sizes} = {self.size} processes but the launch has {world_size}: "
                            "make the sizes multiply to the process count (in the accelerate config, or "
                            "--parallelism_config_dp_shard_size N on the accelerate launch command line)")
        if not fsdp:
            raise UserError("a parallelism_config needs FSDP2 (distributed_type: FSDP, fsdp_version: 2), as in "
                            "accelerate_configs/multi_node_hsdp.yaml, fsdp_tp.yaml and fsdp_cp.yaml")
        if self.dp_replicate > 1 and self.dp_shard == 1:
            raise UserError(f"parallelism_config {sizes} replicates without sharding, which is DDP: use "
                            "accelerate_configs/multi_gpu.yaml, or set dp_shard_size > 1 for HSDP")
        if (self.tp > 1 or self.cp > 1) and self.dp_shard == 1 and self.cp == 1:
            raise UserError(f"parallelism_config {sizes} leaves FSDP2 nothing to shard over: set dp_shard_size >= 2 "
                            "(tensor parallelism runs here as FSDP2 x TP, accelerate_configs/fsdp_tp.yaml)")
        if self.cp > 1:
            if not cuda:
                raise UserError("context parallelism needs GPUs: torch's ring attention has CUDA kernels only")
            if args.attn_implementation != "sdpa":
                raise UserError(f"context parallelism shards sdpa attention, not {args.attn_implementation}: use "
                                "--attn_implementation sdpa")
            if args.block_size % (2 * self.cp):
                raise UserError(f"--block_size {args.block_size} is not a multiple of 2 x cp_size = {2 * self.cp} "
                                "(each cp rank takes two balanced chunks of every sequence): pick a multiple")
            if args.document_masking:
                raise UserError("context parallelism runs causal attention over the whole block and would drop "
                                "--document_masking's per-document masks: train without one of them")

    def check_model(self, config):
        """Tensor parallelism splits heads and the MLP width over tp ranks: the model must have a plan, and
        its sizes must divide."""
        if self.tp == 1:
            return
        try:  # transformers' own plans and their application, as from_pretrained(tp_plan=...) uses them
            from transformers import PreTrainedModel
            from transformers.distributed.tensor_parallel import apply_tensor_parallelism  # noqa: F401
            PreTrainedModel._resolve_parallel_plans  # noqa: B018
        except (ImportError, AttributeError) as e:
            import transformers
            raise UserError(f"tensor parallelism here uses transformers' plans as of 5.24 (this is "
                            f"{transformers.__version__}): pip install -r requirements.txt -c constraints.txt") from e
        if not getattr(config, "base_model_tp_plan", None):
            raise UserError(f"{type(config).__name__.removesuffix('Config')} models have no tensor-parallel plan in "
                            "transformers: use a Llama-style model (--model_preset 125m, ...) or a config without tp_size")
        if getattr(config.get_text_config(), "tie_word_embeddings", False):
            raise UserError("the model ties its output layer to its input embeddings, which the tensor-parallel plan "
                            "shards differently: use a model with untied embeddings, or a config without tp_size")
        for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            value = getattr(config, key, None)
            if value and value % self.tp:
                raise UserError(f"the model's {key} = {value} is not divisible by tp_size {self.tp}: pick a tp_size "
                                "that divides it")


def layout(sizes):
    """'dp_shard 2 x tp 2' from Mesh.record()'s sizes; None: no parallelism_config."""
    if sizes is None:
        return "data parallel"
    return " x ".join(f"{name} {size}" for name, size in sizes.items() if size > 1) or "1 process"


def apply_tensor_parallel(model, tp_mesh):
    """Shard `model` over `tp_mesh` by its transformers tensor-parallel plan (attention and MLP colwise then
    rowwise, the output layer colwise), and make every other parameter a replicated DTensor on the same
    mesh, as FSDP2 x TP needs (Megatron-style: replicated parameters get the same gradient on every tp
    rank). Works on the meta device too (FSDP2 from scratch initializes the shards afterwards)."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module
    from transformers.distributed import DistributedConfig
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    plan, _, _ = model._resolve_parallel_plans(DistributedConfig(tp_size=tp_mesh.size()))
    apply_tensor_parallelism(model, tp_mesh, plan)

    def replicate(name, module, mesh):
        for key, param in list(module.named_parameters(recurse=False)):
            if not isinstance(param, DTensor):
                module.register_parameter(key, torch.nn.Parameter(
                    DTensor.from_local(param, mesh, [Replicate()], run_check=False), param.requires_grad))

    def inputs(module, args, mesh):
        return tuple(DTensor.from_local(a, mesh, [Replicate()], run_check=False)
                     if isinstance(a, torch.Tensor) and not isinstance(a, DTensor) else a for a in args)

    def outputs(module, output, mesh):
        return output.to_local() if isinstance(output, DTensor) else output

    for module in model.modules():
        plain = [p for p in module.parameters(recurse=False) if not isinstance(p, DTensor)]
        if plain:
            distribute_module(module, tp_mesh, replicate, inputs, outputs)
    _accelerate_compatibility()
    return model


def _accelerate_compatibility():
    """accelerate 1.15's FSDP2 x TP prepare imports transformers' ReplicateParallel, which transformers 5.24
    removed. accelerate uses it only for parameters that are not DTensors yet, and apply_tensor_parallel
    leaves none: the name only has to exist."""
    import transformers.integrations.tensor_parallel as tensor_parallel

    if not hasattr(tensor_parallel, "ReplicateParallel"):
        class ReplicateParallel:
            def prepare_module_tp(self, module, mesh):
                raise RuntimeError("a parameter was not replicated by utils/mesh.py apply_tensor_parallel")
        tensor_parallel.ReplicateParallel = ReplicateParallel


def context_parallel(accelerator, batch, cp):
    """Context parallelism (cp > 1): inside this context each cp rank holds two balanced chunks of every
    sequence of `batch` (accelerate, torch's ring attention); wrap forward and backward in it. Labels
    are shifted before the split, so a chunk's last token is still predicted from the next chunk's
    first, and position ids are made explicit, so each chunk keeps its own positions."""
    if cp == 1:
        return contextlib.nullcontext()
    labels = batch["labels"]
    if labels is batch["input_ids"]:  # one tensor under two names would be split twice
        labels = batch["labels"] = labels.clone()
    batch["shift_labels"] = next_token_labels(labels).contiguous()  # utils/loss.py reads it
    if "position_ids" not in batch:
        batch["position_ids"] = torch.arange(labels.shape[1], device=labels.device).expand_as(labels).contiguous()
    buffers = [batch[key] for key in ("input_ids", "labels", "shift_labels", "position_ids")]
    return accelerator.maybe_context_parallel(buffers=buffers, buffer_seq_dims=[1] * len(buffers),
                                              no_restore_buffers=set(buffers))
