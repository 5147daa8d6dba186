"""Sample text from a causal language model: a run's OUTPUT_DIR, one of its checkpoints, or any model.

    python generate.py --model output --prompt "The" --num_samples 3
    python generate.py --model output/checkpoints/step_500 --prompt "The" --temperature 0   # greedy

Loading a checkpoint (config and tokenizer from the run) and sampling live in utils/generate.py.
"""

import argparse

import torch

from utils.errors import run_cli
from utils.generate import generate, load_model_and_tokenizer


def main(argv=None):
    p = argparse.ArgumentParser(description="Generate text with a causal language model.", allow_abbrev=False)
    p.add_argument("--model", required=True, help="OUTPUT_DIR, OUTPUT_DIR/checkpoints/step_N, a model directory or Hub name")
    p.add_argument("--prompt", default="The", help="text to continue ('' starts from the BOS token)")
    p.add_argument("--max_new_tokens", type=int, default=50, help="tokens to generate after the prompt")
    p.add_argument("--temperature", type=float, default=0.8, help="0 picks the most likely token (greedy)")
    p.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens; 0 disables")
    p.add_argument("--top_p", type=float, default=1.0, help="sample among the most likely tokens holding this mass")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same samples")
    p.add_argument("--num_samples", type=int, default=1, help="continuations to print")
    args = p.parse_args(argv)
    for flag in ("max_new_tokens", "num_samples"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        p.error("--temperature and --top_k must be at least 0, --top_p in (0, 1]")
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    samples = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                       args.top_p, args.seed, args.num_samples)
    for i, text in enumerate(samples):
        if len(samples) > 1:
            print(f"--- sample {i + 1} ---")
        print(text)


if __name__ == "__main__":
    run_cli(main)
