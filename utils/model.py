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


def build_model(args, tokenizer):
    """The model to train, with a vocabulary that covers the tokenizer."""
    if args.model_name_or_path:
        try:
            model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, attn_implementation="sdpa")
        except OSError as e:
            raise UserError(f"cannot load model {args.model_name_or_path!r}: check the name, or download it while "
                            "online (offline runs need a local directory)") from e
    else:
        config = model_config(args, tokenizer)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    embeddings = model.get_input_embeddings().num_embeddings
    if embeddings < len(tokenizer):
        raise UserError(f"the model has {embeddings} token embeddings but the tokenizer has {len(tokenizer)} tokens: "
                        "use the model's own tokenizer (--tokenizer_name) or a matching model")
    return model


def model_config(args, tokenizer):
    """The config for a model trained from scratch: --config_name, else a preset sized to the tokenizer."""
    vocab_size = _round_up(len(tokenizer), 64)  # multiples of 64 keep the output matmul on fast kernels
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    if args.config_name:
        try:
            config = AutoConfig.from_pretrained(args.config_name)
        except OSError as e:
            raise UserError(f"cannot load model config {args.config_name!r}: check the name or directory") from e
        config.update(dict(vocab_size=max(config.vocab_size, vocab_size), **special))
        return config
    if args.model_preset not in PRESETS:
        raise UserError(f"unknown --model_preset {args.model_preset!r}: choose one of {', '.join(PRESETS)}")
    return LlamaConfig(vocab_size=vocab_size, max_position_embeddings=max(args.block_size, 2048),
                       tie_word_embeddings=False, **PRESETS[args.model_preset], **special)


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
