"""Command-line flags and YAML recipes.

Flag names follow transformers' `run_clm_no_trainer.py` so users can carry their commands over.
A recipe (`--config FILE.yaml`) may set any flag; flags given on the command line win.
"""

import argparse
import os

import yaml

from utils import errors
from utils.data import TOKENIZER_SAMPLE_DOCUMENTS
from utils.profiling import MAX_STEPS, parse_steps
from utils.errors import UserError
from utils.sources import check_weights, parse_sources, store_weights
from utils.store import read_manifest

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
REPORT_TO = ("none", "tensorboard", "wandb", "all")
PREPARE_DATA_KEYS = {"clean", "minhash_ngrams", "minhash_buckets", "minhash_hashes_per_bucket", "decontaminate_ngrams",
                     "shard_documents"}  # recipe keys of prepare_data.py's own flags
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """-h appends each flag's default; not for unset (None) flags or switches (False), whose help says what happens."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def build_parser():
    # allow_abbrev=False: a typo such as --learning_rat must fail, not silently set --learning_rate
    p = argparse.ArgumentParser(description="Train a causal language model with accelerate.", allow_abbrev=False,
                                formatter_class=_ShowDefaults)
    add = p.add_argument
    add("--config", help="YAML recipe with any of these flags as keys; command-line flags win")
    # Data
    add("--dataset_name", help="Hub dataset name (default: the embedded offline corpus)")
    add("--dataset_config_name", help="the Hub dataset's configuration (subset) name")
    add("--train_file", nargs="+", metavar="FILE_OR_GLOB",
        help="local .txt/.json/.jsonl/.csv/.parquet files: several values (or globs, one source each) make a mixture")
    add("--train_weights", nargs="+", type=float, metavar="W",
        help="relative weight of each --train_file source (default: each weighs its size); 0: evaluated, not trained")
    add("--datasets", help=argparse.SUPPRESS)  # a recipe key: the list of sources (utils/sources.py)
    add("--validation_file", help="local validation file, same formats as --train_file (default: hold out part of train)")
    add("--validation_split_percentage", type=int, default=5,
        help="percent of train held out for validation when there is no validation split")
    add("--data_dir", help="token store written by prepare_data.py: memory-mapped, nothing is tokenized in the job "
        "(replaces --dataset_name / --train_file)")
    add("--text_column", default="text", help="column holding the text (a single string column is found by itself)")
    add("--block_size", type=int, default=128, help="tokens per training sequence")
    add("--preprocessing_num_workers", type=int, default=None,
        help="processes for tokenizing (default: one, whose Rust tokenizer uses every core)")
    add("--dataloader_num_workers", type=int, default=0,
        help="background processes that load batches (0: the training process)")
    add("--streaming", action="store_true",
        help="read, tokenize and pack the data on the fly (corpora too large to tokenize up front); "
             "needs --max_train_steps")
    add("--stream_shuffle_blocks", type=int, default=1024,
        help="with --streaming: shuffle blocks within windows of this many (rounded up to whole optimizer steps); "
             "a resume re-reads one window; 1 keeps the stream's order")
    add("--stream_readers", type=int, default=None,
        help="with --streaming: read each source in this many parts, fixed for the run (default: the process count "
             "at the start; a resume keeps the checkpoint's); each process reads its own parts when the process "
             "count divides them, else the main process reads all and dispatches the batches")
    add("--attn_implementation", default="sdpa", choices=ATTENTION,
        help="attention kernel (transformers'); flash_attention_2/3 need the flash-attn package and a GPU")
    add("--document_masking", action="store_true",
        help="tokens attend only within their own document inside a packed block (position ids restart at each "
             "document, and its first token is not predicted from the document before it)")
    add("--max_eval_samples", type=int, default=None,
        help="validation blocks evaluated per source (default: 1,048,576 tokens' worth); of a split held out of "
             "train, what evaluation does not use is trained on")
    add("--vocab_size", type=int, default=4096, help="size of a tokenizer trained here when none is given")
    add("--tokenizer_sample_documents", type=int, default=TOKENIZER_SAMPLE_DOCUMENTS,
        help="documents a tokenizer trained here learns from, in equal parts per source, spread evenly through "
             "each (a stream: its first ones); about 20 s per 50,000 web documents")
    # Model
    add("--model_name_or_path", help="pretrained model (Hub name or local directory) to continue training")
    add("--config_name", help="model config (Hub name or local directory) to train from scratch")
    add("--tokenizer_name", help="tokenizer (Hub name or local directory); default: the model's, else trained here")
    add("--model_preset", default="small",
        help="named size: Llama-style tiny, small, 125m, 350m, 1b or GPT-2 gpt2-tiny, gpt2, gpt2-medium, gpt2-large, "
             "gpt2-xl (utils/model.py)")
    # Optimization
    add("--per_device_train_batch_size", type=int, default=16,
        help="sequences per process per forward pass (the micro-batch)")
    add("--per_device_eval_batch_size", type=int, default=None,
        help="sequences per process per evaluation forward pass (default: the training micro-batch, which fits)")
    add("--gradient_accumulation_steps", type=int, default=1,
        help="micro-batches per optimizer step (or let --global_batch_size derive it)")
    add("--global_batch_size", type=int, default=None,
        help="sequences per optimizer step; derives gradient accumulation from micro-batch x processes")
    add("--learning_rate", type=float, default=3e-3, help="peak learning rate of AdamW, reached after warmup")
    add("--weight_decay", type=float, default=0.1, help="AdamW decoupled weight decay, on weight matrices only")
    add("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    add("--adam_beta2", type=float, default=0.95, help="AdamW beta2")
    add("--lr_scheduler_type", default="cosine", choices=SCHEDULERS,
        help="after --num_warmup_steps: decay to 0 (linear), to min_lr_ratio (cosine), or stay; "
             "'constant' has no warmup, 'constant_with_warmup' has")
    add("--num_warmup_steps", type=int, default=20, help="optimizer steps of linear warmup to --learning_rate")
    add("--min_lr_ratio", type=float, default=0.1, help="cosine decays to learning_rate x this")
    add("--num_train_epochs", type=int, default=3,
        help="passes over the training data, unless --max_train_steps is given")
    add("--max_train_steps", type=int, default=None, help="optimizer steps; overrides num_train_epochs")
    add("--max_grad_norm", type=float, default=1.0, help="gradient clipping; 0 disables")
    add("--seed", type=int, default=42, help="seed for the initial weights, the data order and sampling")
    # Loop, checkpoints, output
    add("--output_dir", default="output", help="where the model, metrics, report and checkpoints go")
    add("--eval_steps", type=int, default=100, help="evaluate every N optimizer steps (always at start and end)")
    add("--logging_steps", type=int, default=10, help="log loss, lr, tokens/s, MFU and memory every N optimizer steps")
    add("--checkpointing_steps", type=int, default=None, help="save a resumable checkpoint every N steps")
    add("--checkpoints_total_limit", type=int, default=None, help="keep only the newest N checkpoints")
    add("--resume_from_checkpoint", help="checkpoint directory, or 'latest' in OUTPUT_DIR/checkpoints")
    add("--report_to", default="none", choices=REPORT_TO,
        help="trackers besides metrics.jsonl: TensorBoard, wandb, both (all) or none")
    add("--project_name", default="clm-training", help="wandb project")
    add("--run_name", help="wandb run name and TensorBoard sub-directory (default: the output directory's name)")
    add("--peak_flops", type=float, default=None, help="device peak FLOP/s for MFU when not in the built-in table")
    add("--sample_prompt", default="The", help="prompt for the sample generated at the end")
    add("--sample_max_new_tokens", type=int, default=40, help="length of the sample generated at the end")
    add("--max_nonfinite_steps", type=int, default=3,
        help="stop after this many consecutive optimizer steps with inf/NaN loss or gradients (each is skipped); "
             "0 turns the check and its once-per-step host sync off")
    add("--spike_sigma", type=float, default=6.0,
        help="loss spikes: skip the update of a step whose training loss or gradient norm is this many standard "
             "deviations above the mean of the last --spike_window steps (OLMo-core's default); 0 turns spike "
             "handling off")
    add("--spike_window", type=int, default=128,
        help="steps the spike check compares against; it starts once half of them are in")
    add("--spike_rollback_outliers", type=int, default=None,
        help="this many loss outliers within --spike_rollback_window steps is a sustained spike: roll back to the "
             "newest checkpoint before it and skip the data that led into it (default 3; 2 under DeepSpeed, which "
             "applies an outlier's update, so the model drifts toward the bad data and fewer later steps stand out)")
    add("--spike_rollback_window", type=int, default=16, help="steps within which outliers count as one spike")
    add("--max_rollbacks", type=int, default=3,
        help="stop (exit code 3, checkpoints kept) when one spike comes back after this many rollbacks (a rollback "
             "within --spike_window steps of the one before counts as the same spike's)")
    add("--profile_steps", metavar="A:B",
        help=f"record a torch.profiler trace of optimizer steps A to B (at most {MAX_STEPS}) into OUTPUT_DIR/profile: "
             "a gzipped Chrome trace per rank (Perfetto, TensorBoard) and the steps' time by part in report.md")
    add("--profile_ranks", default="0", help="ranks --profile_steps records: '0', a list such as '0,8', or 'all'")
    add("--memory_snapshot", action="store_true",
        help="CUDA: record every allocation from the start and write a memory snapshot after --profile_steps "
             "(pytorch.org/memory_viz); an out-of-memory error writes one in any case")
    add("--torch_compile", action="store_true", help="compile the model with torch.compile (inductor)")
    add("--gradient_checkpointing", action="store_true", help="trade ~30%% more compute for much less activation memory")
    add("--activation_offloading", action="store_true",
        help="keep the activations saved for backward in CPU memory, not on the GPU (weights and autocast's copies "
             "of them stay); with or without --gradient_checkpointing (then each layer's input is offloaded)")
    add("--ddp_timeout", type=int, default=1800,
        help="seconds a collective may wait (NCCL/gloo) before the run fails; raise it for slow checkpoint saves")
    add("--eval_only", action="store_true",
        help="only measure --model_name_or_path on the validation split: OUTPUT_DIR/eval_results.json, no training")
    add("--push_to_hub", action="store_true", help="upload OUTPUT_DIR to the Hugging Face Hub at the end")
    add("--hub_model_id", help="Hub repository for --push_to_hub, 'user/name' (default: --run_name in your namespace)")
    add("--debug", action="store_true", help="show tracebacks for user errors")
    return p


def parse_args(argv=None, parser=None, writes_store=False):
    """train.py's flags (or `parser`'s, a build_parser() with more) from the command line and a recipe;
    writes_store: for prepare_data.py, whose --data_dir is the store to write, not one to read."""
    parser = parser or build_parser()
    recipe_path = _recipe_path(argv)
    if recipe_path:
        parser.set_defaults(**load_recipe(recipe_path, parser))
    args = parser.parse_args(argv)
    errors.show_tracebacks = args.debug  # from the command line or the recipe
    validate(args, writes_store)
    if args.data_dir and not writes_store:  # a store holds its sources; a recipe's datasets: list may weigh them
        args.sources = None
        if args.datasets is not None and args.train_weights is None:  # matched to the store's sources by name
            args.train_weights = store_weights(read_manifest(args.data_dir)["sources"], args.datasets, args.data_dir)
        else:
            check_weights(args.train_weights or [])
    else:
        args.sources = parse_sources(args)
    args.run_name = args.run_name or os.path.basename(os.path.abspath(args.output_dir))
    return args


def _recipe_path(argv):
    finder = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    finder.add_argument("--config")
    return finder.parse_known_args(argv)[0].config


def load_recipe(path, parser):
    if not os.path.isfile(path):
        raise UserError(f"recipe file {path} does not exist: check the --config path")
    try:
        with open(path) as f:
            recipe = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise UserError(f"recipe file {path} is not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(recipe, dict):
        raise UserError(f"recipe file {path} must be a mapping of flag names to values")
    known = {a.dest for a in parser._actions} - {"help", "config"}
    prepare_only = sorted(PREPARE_DATA_KEYS & set(recipe) - known)  # train.py reading prepare_data.py's recipe
    if prepare_only:
        given = [k for k in prepare_only if recipe[k] is not None]
        recipe = {k: v for k, v in recipe.items() if k not in prepare_only}
        recipe["prepare_data_keys"] = given  # refused in validate() unless training from the store
    unknown = sorted(set(recipe) - known - {"prepare_data_keys"})
    if unknown:
        raise UserError(f"recipe {path} has unknown key(s) {', '.join(unknown)}: use flag names without '--'")
    for action in parser._actions:
        if recipe.get(action.dest) is not None and action.nargs in ("+", "*") and not isinstance(recipe[action.dest], list):
            recipe[action.dest] = [recipe[action.dest]]  # `clean: all` as `clean: [all]`
        values = (recipe.get(action.dest) or []) if action.nargs in ("+", "*") else [recipe.get(action.dest)]
        if action.dest in recipe and action.choices and any(v not in action.choices for v in values):
            raise UserError(f"recipe {path}: {action.dest}={recipe[action.dest]!r} is not one of {list(action.choices)}")
    return recipe


def validate(args, writes_store=False):
    """Cheap checks that must fail before any model or data is loaded."""
    if getattr(args, "prepare_data_keys", None) and not args.data_dir:  # a recipe's, meant for prepare_data.py
        raise UserError(f"the recipe's {', '.join(args.prepare_data_keys)} are prepare_data.py's: run it with this "
                        "recipe and --data_dir STORE, then train.py --data_dir STORE (train.py does not clean text)")
    if args.per_device_eval_batch_size is None:  # what fits in training fits in evaluation (no gradients)
        args.per_device_eval_batch_size = args.per_device_train_batch_size
    for flag in ("block_size", "per_device_train_batch_size", "per_device_eval_batch_size", "tokenizer_sample_documents",
                 "gradient_accumulation_steps", "logging_steps", "num_train_epochs"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1 (got {getattr(args, flag)})")
    if args.spike_window < 2:
        raise UserError(f"--spike_window must be at least 2 (got {args.spike_window}): a deviation needs two steps")
    for flag in ("max_train_steps", "max_eval_samples", "stream_shuffle_blocks", "stream_readers", "eval_steps",
                 "checkpointing_steps", "spike_rollback_outliers", "spike_rollback_window",
                 "checkpoints_total_limit", "global_batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be at least 1 (got {value})")
    if args.spike_sigma < 0 or args.max_rollbacks < 0:
        raise UserError("--spike_sigma (0: off) and --max_rollbacks must be 0 or more")
    if isinstance(args.profile_steps, (str, int)):
        try:
            args.profile_steps = parse_steps(str(args.profile_steps))
        except ValueError as e:
            raise UserError(str(e)) from None
    if isinstance(args.profile_ranks, (str, int)):
        text = str(args.profile_ranks)
        try:
            args.profile_ranks = None if text == "all" else sorted({int(r) for r in text.split(",")})
        except ValueError:
            raise UserError(f"--profile_ranks {text!r} is not 'all' or ranks such as '0,8'") from None
    if args.max_nonfinite_steps < 0:
        raise UserError("--max_nonfinite_steps must be 0 (off) or more")
    if not 0 < args.validation_split_percentage < 100:
        raise UserError("--validation_split_percentage must be between 1 and 99")
    if args.streaming and not (args.max_train_steps or args.eval_only):
        raise UserError("--streaming needs --max_train_steps: a stream's length is unknown until it has been read")
    if args.stream_readers and not args.streaming:
        raise UserError("--stream_readers splits a stream: add --streaming, or drop --stream_readers")
    if args.streaming and args.dataloader_num_workers:
        raise UserError("--streaming reads in the main process, whose position a checkpoint records (the tokenizer "
                        "uses every core itself): drop --dataloader_num_workers")
    if args.data_dir and not writes_store:
        given = [f"--{flag}" for flag in ("dataset_name", "train_file", "validation_file", "streaming") if getattr(args, flag)]
        if given:
            raise UserError(f"--data_dir holds the tokenized data: drop {', '.join(given)} (they went to prepare_data.py)")
        read_manifest(args.data_dir)  # a missing or incomplete store fails here (a damaged one: open_blocks)
    if args.dataset_name and args.train_file:
        raise UserError("give either --dataset_name or --train_file, not both")
    if args.attn_implementation.startswith("flash_attention"):
        from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

        version = args.attn_implementation[-1]
        if not {"2": is_flash_attn_2_available, "3": is_flash_attn_3_available}[version]():
            raise UserError(f"--attn_implementation {args.attn_implementation} needs a GPU and the flash-attn package "
                            f"(version {version}): install it, or use sdpa (PyTorch's own flash kernels)")
    if args.model_name_or_path and args.config_name:
        raise UserError("give either --model_name_or_path (continue training) or --config_name (from scratch), not both")
    if args.eval_only and not args.model_name_or_path:
        raise UserError("--eval_only needs the model to measure: pass --model_name_or_path DIR")
    if args.eval_only and args.push_to_hub:
        raise UserError("--eval_only trains nothing to push: drop --push_to_hub")
    if args.push_to_hub:
        from utils.hub import check_can_push  # imported here: utils.hub imports UserError from this module

        check_can_push()
    _check_output_dir(args.output_dir)
    if args.train_weights is not None and not (args.train_file or args.data_dir):
        raise UserError("--train_weights weighs the --train_file sources (or a --data_dir store's): give those")


def _check_output_dir(path):
    """The output directory, or the nearest existing folder above it, must be a writable directory."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--output_dir {path} is not writable ({existing} is not a writable directory): "
                        "choose another --output_dir")
