"""Model: a Llama-style preset, a config (Hub name or directory), or pretrained weights.

The model class is transformers' own and stays untouched; precision, sharding and compilation
are applied from outside by accelerate.
"""

from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from utils.config import UserError

# Llama-style sizes. Parameter counts are for a 32k vocabulary (tiny/small use the trained 4k one).
PRESETS = {
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
    return LlamaConfig(vocab_size=vocab_size, max_position_embeddings=max(args.block_size, 2048),
                       tie_word_embeddings=False, **PRESETS[args.model_preset], **special)


def build_model(args, config):
    """Pretrained weights for --model_name_or_path, else a freshly initialized model."""
    if args.model_name_or_path:
        return AutoModelForCausalLM.from_pretrained(args.model_name_or_path, config=config, attn_implementation="sdpa")
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def parameter_count(module):
    """Parameters in the model, also when ZeRO-3's zero.Init has already partitioned them away."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def training_flops_per_token(model, seq_len):
    """Forward + backward FLOPs per token: 6 x (parameters in matmuls) + attention scores (PaLM appendix B).

    The input embedding is a lookup, not a matmul, so it is left out; tied output weights stay in.
    """
    config = model.config
    params = parameter_count(model)
    if not config.tie_word_embeddings:
        params -= parameter_count(model.get_input_embeddings())
    layers = config.num_hidden_layers
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    return 6 * params + 12 * layers * hidden * seq_len
