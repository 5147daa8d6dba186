"""Train a causal language model (GPT-2 / Llama style) with Hugging Face Accelerate.

    accelerate launch train.py                                   # embedded default job, offline
    accelerate launch --config_file accelerate_configs/X.yaml train.py --train_file my.txt ...

The same script runs on a CPU, one GPU, multi-GPU DDP, FSDP and DeepSpeed ZeRO 1/2/3: the
accelerate config file decides processes, precision and sharding. Flags: `python train.py -h`.
"""

import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from tqdm.auto import tqdm

from utils.checkpoint import load_checkpoint, prepare_resume, resolve_resume, save_checkpoint
from utils.config import parse_args
from utils.errors import run_cli
from utils.data import build_dataloaders, load_raw_datasets, load_tokenizer, resolve_text_column, tokenize_and_pack
from utils.faults import EXIT_PREEMPTED, NonFiniteGuard, StopSignal
from utils.files import write_atomic
from utils.generate import generate
from utils.hub import push_to_hub, set_generation_ids, write_model_card
from utils.metrics import (MetricsLog, WindowTimer, configure_trackers, device_peak_flops, peak_memory_gib,
                           perplexity, tracker_init_kwargs, trackers)
from utils.model import build_model, load_base_config, model_config, parameter_count, training_flops_per_token
from utils.optim import build_optimizer, build_scheduler
from utils.preflight import preflight
from utils.report import write_report
from utils.stream import stream_blocks


@torch.no_grad()
def evaluate(model, eval_dataloader, accelerator):
    """Mean token loss over the whole validation split, each block counted once across processes."""
    model.eval()
    losses = []
    for batch in eval_dataloader:
        ids = batch["input_ids"]
        logits = model(input_ids=ids).logits
        token_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
        losses.append(accelerator.gather_for_metrics(token_loss.view(ids.shape[0], -1).mean(dim=1)))
    model.train()
    return torch.cat(losses).mean().item()


def evaluate_only(model, eval_dataloader, accelerator, args, eval_blocks):
    """--eval_only: loss and perplexity of --model_name_or_path on the validation split; nothing is trained."""
    eval_loss = evaluate(model, eval_dataloader, accelerator)
    results = dict(eval_loss=eval_loss, perplexity=perplexity(eval_loss), eval_tokens=eval_blocks * args.block_size,
                   model=args.model_name_or_path, block_size=args.block_size)
    if accelerator.is_main_process:
        write_atomic(os.path.join(args.output_dir, "eval_results.json"), json.dumps(results, indent=2))
        print(f"{args.model_name_or_path}: eval loss {eval_loss:.4f}, perplexity {perplexity(eval_loss):.2f} over "
              f"{results['eval_tokens']:,} tokens; written to {os.path.join(args.output_dir, 'eval_results.json')}")
    accelerator.end_training()


def main(argv=None):
    # ---- Setup: everything that can fail on bad input fails here, before any expensive work ----
    args = parse_args(argv)
    plan = preflight(args)  # reconciles flags with the accelerate / DeepSpeed config files
    resume_from, resume_state = resolve_resume(args.output_dir, args.resume_from_checkpoint)
    base_config = load_base_config(args)
    configure_trackers(args)
    accelerator = Accelerator(gradient_accumulation_steps=plan.gradient_accumulation_steps,
                              log_with=trackers(args),
                              project_dir=args.output_dir, kwargs_handlers=plan.kwargs_handlers,
                              dynamo_backend="inductor" if args.torch_compile else None,  # None: the config's
                              dataloader_config=DataLoaderConfiguration(non_blocking=torch.cuda.is_available()))
    plan.apply(accelerator)
    accelerator.print(plan.describe(accelerator))
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    # ---- Data: load, tokenize once (cached), pack into blocks ----
    raw = load_raw_datasets(args)
    text_column = resolve_text_column(raw["train"], args.text_column)
    tokenizer = load_tokenizer(args, raw["train"], text_column, accelerator)
    config = model_config(args, base_config, tokenizer)
    if args.streaming:  # tokenized and packed on the fly while training; only validation blocks are made now
        blocks = stream_blocks(raw, text_column, tokenizer, args)
    else:
        blocks = tokenize_and_pack(raw, text_column, tokenizer, args, accelerator)
    samples_per_step = plan.samples_per_step(accelerator)
    train_dataloader, eval_dataloader, train_order = build_dataloaders(blocks, args, samples_per_step)
    steps_per_epoch = None if args.streaming else train_order.usable // samples_per_step
    max_steps = args.max_train_steps or (steps_per_epoch or 0) * args.num_train_epochs  # 0: --eval_only of a stream
    tokens_per_step = samples_per_step * args.block_size

    # ---- Model and optimizer ----
    set_seed(args.seed)  # right before init: the weights depend on the seed alone, whatever ran before
    with plan.model_init_context(accelerator):
        model = build_model(args, config)
    if args.gradient_checkpointing:  # recompute each layer's activations in backward: less memory, ~30% more compute
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    flops_per_token = training_flops_per_token(model, args.block_size)  # before sharding hides parameters
    n_params = parameter_count(model)
    optimizer = build_optimizer(model, args)
    # another process count under DeepSpeed: converted to its universal format, before prepare builds the engine
    load_from = prepare_resume(accelerator, resume_from, resume_state) if resume_from else None
    model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader)
    lr_scheduler = build_scheduler(optimizer, args, max_steps)
    accelerator.register_for_checkpointing(lr_scheduler)
    train_size = f"{len(blocks['train'])} train blocks ({steps_per_epoch} steps/epoch)" if steps_per_epoch else "streamed"
    accelerator.print(f"model: {n_params / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} MFLOPs/token | data: "
                      f"{train_size}, {len(blocks['validation'])} validation blocks of {args.block_size} | {max_steps} steps")
    if args.eval_only:  # measure an existing model through the same data pipeline, then stop
        return evaluate_only(model, eval_dataloader, accelerator, args, len(blocks["validation"]))

    # ---- Resume or start ----
    step, initial_eval_loss, epoch, samples_in_epoch = 0, None, 0, 0
    if resume_from:
        load_checkpoint(accelerator, load_from, resume_state, samples_per_step, model)
        step, initial_eval_loss, epoch = resume_state["step"], resume_state["initial_eval_loss"], resume_state["epoch"]
        position = resume_state["data_position"]
        if position["epoch_complete"]:  # saved after an epoch's last step
            epoch += 1
        else:
            samples_in_epoch = position["samples_into_epoch"]
            train_order.start_at(position)  # exact, and nothing before it is read again
        accelerator.print(f"resumed from {resume_from} at step {step}")
    elif args.resume_from_checkpoint:
        accelerator.print(f"no checkpoint in {args.output_dir}/checkpoints yet: starting fresh")
    metrics = MetricsLog(accelerator, args.output_dir, keep_through_step=step if resume_from else None)
    accelerator.init_trackers(args.project_name, config=plan.tracker_config(args), init_kwargs=tracker_init_kwargs(args))
    if initial_eval_loss is None:
        initial_eval_loss = evaluate(model, eval_dataloader, accelerator)
        metrics.log(0, eval_loss=initial_eval_loss, perplexity=perplexity(initial_eval_loss))
        accelerator.print(f"step 0: eval loss {initial_eval_loss:.4f}, perplexity {perplexity(initial_eval_loss):.1f}")

    peak_flops = device_peak_flops(accelerator.device, args.peak_flops)
    progress = tqdm(total=max_steps, initial=step, disable=not accelerator.is_local_main_process, desc="training",
                    file=sys.stdout)  # stderr stays for warnings and errors
    loss_sum = torch.zeros((), device=accelerator.device)  # summed on device; read only when logging
    timer, stop = WindowTimer(), StopSignal()
    nonfinite = NonFiniteGuard(args.max_nonfinite_steps, loss_scaling=accelerator.mixed_precision == "fp16",
                               scaler=accelerator.scaler)
    window_steps, run_steps, eval_loss = 0, 0, None

    def checkpoint():
        return save_checkpoint(accelerator, args.output_dir, dict(
            step=step, epoch=epoch, samples_seen=step * samples_per_step,
            # only the main process reads a stream (accelerate dispatches its batches), so only it knows where
            data_position=train_order.position(samples_in_epoch) if accelerator.is_main_process else None,
            samples_per_step=samples_per_step, initial_eval_loss=initial_eval_loss, config=vars(args),
            num_processes=accelerator.num_processes, distributed_type=accelerator.distributed_type.value),
            args.checkpoints_total_limit)

    # ---- Training loop ----
    model.train()
    while step < max_steps:
        train_dataloader.set_epoch(epoch)
        for batch in train_dataloader:
            timer.batch_arrived()
            with accelerator.accumulate(model):
                loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:  # clip to inf = just measure the norm
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or math.inf)
                    finite = nonfinite.step(optimizer, grad_norm)  # skips a non-finite update; fp16: the scaler does
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            timer.batch_done()
            if not accelerator.sync_gradients:
                continue
            lr_scheduler.step()
            step += 1
            samples_in_epoch += samples_per_step
            window_steps += 1
            run_steps += 1
            progress.update(1)
            nonfinite.record(finite, step)

            if step % args.logging_steps == 0 or step == max_steps:
                micro_batches = window_steps * accelerator.gradient_accumulation_steps  # equal sizes: mean of means
                mean_loss = (accelerator.reduce(loss_sum, "mean") / micro_batches).item()
                elapsed, data_wait_pct = timer.close_window()
                tokens_per_second = window_steps * tokens_per_step / elapsed
                metrics.log(step, loss=mean_loss, lr=lr_scheduler.get_last_lr()[0],
                            grad_norm=None if grad_norm is None else float(grad_norm),
                            tokens_per_second=tokens_per_second,
                            mfu=peak_flops and flops_per_token * tokens_per_second / (peak_flops * accelerator.num_processes),
                            peak_memory_gib=peak_memory_gib(accelerator), data_wait_pct=data_wait_pct,
                            nonfinite_steps=nonfinite.total, loss_scale_skips=nonfinite.loss_scale_skips or None,
                            epoch=epoch)
                progress.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tokens_per_second:.0f}")
                loss_sum.zero_()
                window_steps = 0

            with timer.paused():  # evaluation and saving are not training time
                if (args.eval_steps and step % args.eval_steps == 0) or step == max_steps:
                    eval_loss = evaluate(model, eval_dataloader, accelerator)
                    metrics.log(step, eval_loss=eval_loss, perplexity=perplexity(eval_loss))
                    progress.write(f"step {step}: eval loss {eval_loss:.4f}, perplexity {perplexity(eval_loss):.1f}")
                saved = checkpoint() if args.checkpointing_steps and step % args.checkpointing_steps == 0 else None
            if stop.agreed(accelerator):  # preemption / Ctrl-C: keep this step, then exit
                path = saved or checkpoint()
                accelerator.print(f"{stop.received or 'stop signal'} received: saved {path} after step {step}; "
                                  "run the same command with --resume_from_checkpoint latest to continue")
                stop.close()
                accelerator.end_training()
                sys.exit(EXIT_PREEMPTED)
            if step >= max_steps:
                break
        epoch, samples_in_epoch = epoch + 1, 0
    progress.close()
    stop.close()

    # ---- Save a Hugging Face model, report, and show a sample ----
    if eval_loss is None:  # resumed at the end: nothing was trained in this run
        eval_loss = evaluate(model, eval_dataloader, accelerator)
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    set_generation_ids(unwrapped, tokenizer)  # generation_config.json stops at EOS and pads with the tokenizer's ids
    unwrapped.save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process,
                              save_function=accelerator.save, state_dict=accelerator.get_state_dict(model))
    with accelerator.autocast():  # sharded parameters (ZeRO-3, FSDP): every process generates in lock-step
        sample = generate(unwrapped, tokenizer, args.sample_prompt, args.sample_max_new_tokens, seed=args.seed,
                          synced_gpus=plan.sharded_parameters)[0]
    if accelerator.is_main_process:
        tokenizer.save_pretrained(args.output_dir)
        results = dict(initial_eval_loss=initial_eval_loss, eval_loss=eval_loss, perplexity=perplexity(eval_loss),
                       initial_perplexity=perplexity(initial_eval_loss), steps=step,
                       train_tokens=step * tokens_per_step,
                       tokens_per_second=run_steps * tokens_per_step / timer.train_seconds if run_steps else None,
                       train_seconds=timer.train_seconds, nonfinite_steps=nonfinite.total, parameters=n_params,
                       sample=sample, **plan.record(accelerator), config=vars(args))
        write_atomic(os.path.join(args.output_dir, "results.json"), json.dumps(results, indent=2))
        print(f"eval perplexity {perplexity(initial_eval_loss):.1f} -> {perplexity(eval_loss):.1f} "
              f"({perplexity(initial_eval_loss - eval_loss):.1f}x lower); model saved to {args.output_dir}")
        print(f"sample: {sample}")
        write_model_card(args.output_dir)  # README.md: the model card of OUTPUT_DIR as a Hub repository
        print(f"report: {write_report(args.output_dir)}")
        if args.push_to_hub:
            print(f"uploaded to {push_to_hub(args.output_dir, args.hub_model_id or args.run_name)}")
    accelerator.end_training()  # last: it tears down the process group
    if accelerator.num_processes > 1:
        # Every file is written and the process group is gone. Skip the interpreter's teardown, where
        # DeepSpeed/gloo background threads sometimes abort a finished run ("terminate called ...").
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    run_cli(main)
