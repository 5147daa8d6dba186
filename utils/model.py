"""Model: a Llama-style or GPT-2 preset, a config (Hub name or directory), or pretrained weights.

The model class is transformers' own and stays untouched; precision, sharding and compilation
are applied from outside by accelerate.
"""

import hashlib
from contextlib import nullcontext

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from utils.errors import UserError
from utils.loss import causal_lm_loss

# Llama-style sizes (SwiGLU, RMSNorm, rotary, grouped-query attention). Parameter counts are for a
# 32k vocabulary (tiny/small use the trained 4k one).
LLAMA = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=192),  # tests
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=768),  # ~5M, the CPU default
    "125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                 intermediate_size=2048),  # ~134M, GPT-2 small class
    "350m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8,
                 intermediate_size=2816),  # ~350M
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192),  # ~1.2B, Llama-3.2-1B shape
}
# The GPT-2 family (learned positions, GELU MLP, LayerNorm, tied embeddings), as published; the counts
# are for GPT-2's 50,257-token vocabulary and 1,024 positions. Dropout is off, as in modern pre-training.
GPT2 = {
    "gpt2-tiny": dict(n_embd=64, n_layer=2, n_head=4),  # tests
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12),  # 124,439,808
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),  # 354,823,168
    "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20),  # 774,030,080
    "gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25),  # 1,557,611,200
}
PRESETS = [*LLAMA, *GPT2]
# attention implementations whose masks transformers builds from packed position ids at any batch size
PACKED_POSITIONS_AT_ANY_BATCH = ("sdpa", "eager", "flex_attention")


def preset_config(name, vocab_size, block_size=0, **special_ids):
    """The transformers config of preset `name` for a vocabulary of `vocab_size` tokens."""
    if name in GPT2:
        return GPT2Config(vocab_size=vocab_size, n_positions=max(block_size, 1024), resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0, **GPT2[name], **special_ids)
    return LlamaConfig(vocab_size=vocab_size, max_position_embeddings=max(block_size, 2048), tie_word_embeddings=False,
                       **LLAMA[name], **special_ids)


def load_base_config(args):
    """The config of --model_name_or_path or --config_name, loaded first so a bad name fails early."""
    name = args.model_name_or_path or args.config_name
    if name is None:
        if args.model_preset not in PRESETS:
            raise UserError(f"unknown --model_preset {args.model_preset!r}: choose one of {', '.join(PRESETS)}")
        return None
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {name!r} ({type(e).__name__}): check the name, or download it "
                        "while online (offline runs need a local directory)") from e


def model_config(args, base_config, tokenizer):
    """The final config: pretrained as is, --config_name or a preset sized to cover the tokenizer."""
    if args.model_name_or_path:
        if base_config.vocab_size < len(tokenizer):
            raise UserError(f"model {args.model_name_or_path} has {base_config.vocab_size} token embeddings but the "
                            f"tokenizer has {len(tokenizer)} tokens: use the model's own tokenizer")
        return base_config
    vocab_size = _round_up(len(tokenizer), 64)  # multiples of 64 keep the output matmul on fast kernels
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    if base_config is not None:
        base_config.update(dict(vocab_size=max(base_config.vocab_size, vocab_size), **special))
        return base_config
    return preset_config(args.model_preset, vocab_size, args.block_size, **special)


def import_model_code(config):
    """Import the modeling module of `config`'s causal-LM class now, and return the class.

    DeepSpeed's zero.Init replaces torch's tensor constructors while it is active; a transformers
    module first imported inside it (transformers >= 5.24 then imports torch._dynamo, which checks
    `torch.Tensor.__new__`) fails with "Signature mismatch". Importing before zero.Init avoids that."""
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError as e:
        raise UserError(f"{type(config).__name__} has no causal language model class in transformers: "
                        "choose a decoder-only model (GPT-2, Llama, ...)") from e


def build_model(config, pretrained=None, seed=0, gradient_checkpointing=False, attention="sdpa"):
    """The weights of `pretrained` (a Hub name or directory), else a model initialized from `seed` alone.
    gradient_checkpointing: recompute each layer's activations in backward (less memory, ~30% more compute);
    attention: transformers' attn_implementation."""
    if pretrained:
        model = AutoModelForCausalLM.from_pretrained(pretrained, config=config, attn_implementation=attention)
    else:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attention)
        if not next(model.parameters()).is_meta:  # on the meta device: initialized once sharded (initialize_shards)
            initialize_by_name(model, seed)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.loss_function = causal_lm_loss  # the same loss, its fp32 logits a slice at a time (utils/loss.py)
    if attention not in PACKED_POSITIONS_AT_ANY_BATCH:  # flash attention, and kernels like it
        model.register_forward_pre_hook(_packed_documents_for_flash, with_kwargs=True)
    return model


def _packed_documents_for_flash(model, args, kwargs):
    """Document masking under flash attention at any batch size. Restarting position ids mark packed
    documents (utils/data.py Collate); transformers' flash path reads them only at batch size 1, so a
    larger micro-batch gets the documents' bounds over the flattened batch (every row starts one),
    which flash's varlen kernel takes at any batch size (as DataCollatorWithFlattening provides them).
    Training and evaluation only (use_cache=False): generation's positions are not packed documents."""
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and position_ids.shape[0] > 1 and kwargs.get("use_cache") is False \
            and "cu_seq_lens_q" not in kwargs:
        (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(position_ids)
        kwargs.update(cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k, max_length_q=int(max_q), max_length_k=int(max_k))
    return args, kwargs


def initialize_by_name(model, seed):
    """Re-initialize every parameter so its value depends only on the seed and the module's name.

    The model's own `_init_weights` rules (transformers') run on a CPU copy of one module at a time,
    with the random generator seeded from (seed, module name), and the result is copied in. So DDP,
    FSDP2 (each process copies its own shard of a DTensor) and ZeRO-3 with zero.Init (where each
    process holds only a shard, and transformers draws the weights in another order) start from
    bit-identical weights, whatever the process count or device. Under zero.Init one module's
    parameters are gathered at a time, so memory stays flat. Modules run children first, as in
    transformers, so a parent that re-initializes a child's weights (GPT-2's scaled projections) has
    the last word.
    """
    zero3 = any(hasattr(p, "ds_id") for p in model.parameters())
    if zero3:
        import deepspeed
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    for name, module in reversed(list(model.named_modules())):
        params = _direct_and_child_params(module)  # a parent's rule may re-initialize its children's weights
        if not params:
            continue
        name = ".".join(part for part in name.split(".") if part not in _WRAPPERS)  # the model's own names
        gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=0) if zero3 else nullcontext()
        with gathered, torch.no_grad():
            if zero3 and rank != 0:  # rank 0's values are scattered to the shards on exit
                continue
            twin = _cpu_twin(module)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little"))
                model._init_weights(twin)
            for real, fresh in zip(params, _direct_and_child_params(twin)):
                touched = ~torch.isnan(fresh)  # NaN: left alone by this module's rule
                if not touched.any():
                    continue
                if isinstance(real, DTensor):  # an FSDP2 shard: this process's part of the whole tensor
                    fresh = distribute_tensor(fresh, real.device_mesh, real.placements, src_data_rank=None).to_local()
                    real, touched = real.to_local(), ~torch.isnan(fresh)
                if touched.all():
                    real.copy_(fresh)
                elif touched.any():
                    real[touched.to(real.device)] = fresh[touched].to(real.dtype).to(real.device)


def initialize_shards(model, seed, device):
    """FSDP2 from scratch: the model was built on the meta device and sharded there, so no process
    allocated more than its shards. Allocate them on `device` and initialize them by the same
    (seed, name) rule as one process's build (initialize_by_name). Buffers (rotary frequencies) were
    built for real, outside the meta device, and stay where FSDP put them."""
    buffers = {name: buffer for name, buffer in model.named_buffers()}
    model.to_empty(device=device)  # parameters keep their objects (a tie survives); buffers are replaced
    for name, buffer in buffers.items():
        owner, _, local = name.rpartition(".")
        model.get_submodule(owner)._buffers[local] = buffer
    with torch.no_grad():
        for param in model.parameters():  # NaN until a rule sets it, so a parameter no rule covers is caught
            _local(param).fill_(float("nan"))
    initialize_by_name(model, seed)
    with torch.no_grad():
        missed = [name for name, param in model.named_parameters()
                  if torch.isnan(_local(param)).any()]
    if torch.distributed.is_initialized():  # every process stops, not only one whose shard no rule covered
        everywhere = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everywhere, missed)
        missed = sorted(set().union(*everywhere))
    if missed:
        raise RuntimeError(f"the model's _init_weights leaves {', '.join(missed[:3])} unset: build it off the meta "
                           "device (utils/distributed.py Plan.init_on_meta)")


_WRAPPERS = {"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"}  # torch.compile, checkpointing


def own_class(module):
    """The module's own class: FSDP2 swaps in a subclass (FSDP<Class>) of it."""
    return next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))


def _local(tensor):
    """This process's part of a DTensor (an FSDP2 shard), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _direct_and_child_params(module):
    return [p for m in (module, *module.children()) for p in m.parameters(recurse=False)]


def _cpu_twin(module):
    """A shallow copy of `module` and its direct children whose parameters are fresh NaN-filled fp32
    CPU tensors of the real shapes (ds_shape under zero.Init); buffers are shared."""
    def twin_of(m, depth):
        twin = object.__new__(own_class(m))  # a shallow copy as copy.copy makes (which FSDP2's subclass breaks)
        twin.__dict__.update(m.__dict__)
        twin._parameters = {k: None if p is None else torch.nn.Parameter(
            torch.full(tuple(getattr(p, "ds_shape", p.shape)), float("nan")), requires_grad=False)
            for k, p in m._parameters.items()}
        twin._modules = {k: twin_of(c, depth - 1) for k, c in m._modules.items() if c is not None} if depth else {}
        return twin
    return twin_of(module, 1)


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def parameter_count(module):
    """Parameters in the model, also when ZeRO-3's zero.Init has already partitioned them away."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def local_parameter_count(model):
    """The parameters this process holds: its shards (FSDP2, tensor parallel, ZeRO-3) or all of them."""
    def local(p):
        if hasattr(p, "ds_tensor"):  # ZeRO-3: the partition
            return p.ds_tensor.numel()
        return _local(p).numel()
    return sum(local(p) for p in model.parameters())


def training_flops_per_token(model, seq_len):
    """Forward + backward FLOPs per token: 6 x (parameters in matmuls) + attention scores (PaLM appendix B).

    Embeddings are lookups, not matmuls: token and learned position embeddings (GPT-2's wpe) are left
    out, except the token embedding when it is tied to the output layer, which is a matmul.
    """
    config = model.config
    lookups = sum(parameter_count(m) for m in model.modules() if isinstance(m, torch.nn.Embedding))
    params = parameter_count(model) - lookups
    if config.tie_word_embeddings:
        params += parameter_count(model.get_input_embeddings())
    layers = config.num_hidden_layers
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    return 6 * params + 12 * layers * hidden * seq_len
