"""Train a causal language model (GPT-2 / Llama style) with Hugging Face Accelerate.

    accelerate launch train.py                                   # embedded default job, offline
    accelerate launch --config_file accelerate_configs/X.yaml train.py --train_file my.txt ...

The same script runs on a CPU, one GPU, multi-GPU DDP, FSDP and DeepSpeed ZeRO 1/2/3: the
accelerate config file decides processes, precision and sharding. Flags: `python train.py -h`.
"""

import contextlib
import json
import math
import os
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, set_seed
from tqdm.auto import tqdm

from utils.checkpoint import Checkpointer
from utils.config import parse_args
from utils.errors import record_exit, run_cli
from utils.data import (IGNORE_INDEX, build_dataloaders, data_signature, load_tokenizer, open_blocks, store_tokenizer,
                        tokenize_and_pack)
from utils.faults import EXIT_PREEMPTED, NonFiniteGuard, StopSignal
from utils.spikes import SpikeDetector
from utils.files import write_atomic
from utils.generate import generate
from utils.export import save_model
from utils.hub import push_to_hub, set_generation_ids, write_model_card
from utils.loss import next_token_labels, token_losses
from utils.offload import ActivationOffloading
from utils.profiling import StepProfiler
from utils.metrics import TrainingMetrics, device_peak_flops, perplexity, tracker_init_kwargs, trackers
from utils.model import (build_model, initialize_shards, load_base_config, local_parameter_count, model_config,
                         parameter_count, preset_config, training_flops_per_token)
from utils.optim import build_optimizer, build_scheduler, regroup_parameters
from utils.distributed import preflight
from utils.mesh import apply_tensor_parallel, context_parallel
from utils.report import sources_text, write_report
from utils.sources import load_source
from utils.stream import stream_blocks, stream_readers


@torch.no_grad()
def evaluate(model, eval_dataloader, accelerator, source_names, cp=1):
    """Loss per predicted token over every source's validation blocks, each block counted once however
    many processes computed it (the loader's padding to even batches, tensor-parallel copies); under
    context parallelism each cp rank computes its part of every block, as in training. Returns (the
    overall loss, {source name: its own loss} when there are several sources)."""
    model.eval()
    part = accelerator.torch_device_mesh["cp"].get_local_rank() if cp > 1 else 0
    gathered = {"sum": [], "count": [], "source": [], "key": []}
    for batch in eval_dataloader:
        source, number = batch.pop("source"), batch.pop("block")  # which source each block is from, its number
        with context_parallel(accelerator, batch, cp), accelerator.autocast():  # cp: this rank's part of each block
            targets = batch.pop("shift_labels", None)  # split with the blocks (cp), else token t+1 is predicted at t
            labels = batch.pop("labels")
            targets = next_token_labels(labels) if targets is None else targets
            logits = model(**batch, use_cache=False).logits
        token_loss = token_losses(logits, targets)  # fp32 a slice at a time, not the whole batch's logits
        for key, value in (("sum", token_loss.sum(dim=1)), ("count", (targets != IGNORE_INDEX).sum(dim=1)),
                           ("source", source), ("key", number * cp + part)):
            gathered[key].append(accelerator.gather(value))
    model.train()
    sums, counts, sources, keys = (torch.cat(gathered[key]) for key in ("sum", "count", "source", "key"))
    order = torch.arange(len(keys), device=keys.device)  # gathered: batch by batch, process by process
    first = torch.full((int(keys.max()) + 1,), len(keys), device=keys.device).scatter_reduce_(0, keys, order, "amin")
    first = first[first < len(keys)]  # each block (each cp part of it) once: its first copy, the same every run
    sums, counts, sources = sums[first], counts[first], sources[first]
    by_source = {name: (sums[sources == i].sum() / counts[sources == i].sum()).item()
                 for i, name in enumerate(source_names)} if len(source_names) > 1 else {}
    return (sums.sum() / counts.sum()).item(), by_source


def evaluate_only(model, eval_dataloader, accelerator, args, blocks, cp=1):
    """--eval_only: loss and perplexity of --model_name_or_path on the validation split; nothing is trained."""
    eval_loss, by_source = evaluate(model, eval_dataloader, accelerator, [b["label"] for b in blocks], cp)
    results = dict(eval_loss=eval_loss, perplexity=perplexity(eval_loss),
                   eval_tokens=sum(len(b["validation"]) for b in blocks) * args.block_size,
                   model=args.model_name_or_path, block_size=args.block_size,
                   sources=[dict(source=b["label"], identity=b["identity"], eval_loss=by_source.get(b["label"], eval_loss))
                            for b in blocks])
    if accelerator.is_main_process:
        write_atomic(os.path.join(args.output_dir, "eval_results.json"), json.dumps(results, indent=2))
        print(f"{args.model_name_or_path}: eval loss {eval_loss:.4f}, perplexity {perplexity(eval_loss):.2f} over "
              f"{results['eval_tokens']:,} tokens; written to {os.path.join(args.output_dir, 'eval_results.json')}")
    accelerator.end_training()


def main(argv=None):
    args = parse_args(argv)
    accelerator, plan, checkpointer, base_config = setup(args)
    samples_per_step = plan.samples_per_step(accelerator)

    # ---- Data: load, tokenize once (cached), pack into blocks ----
    tokenizer, config, blocks, train_dataloader, eval_dataloader, train_order = load_data(
        args, accelerator, base_config, samples_per_step, plan.mesh, checkpointer.resumed_data_position)
    checkpointer.check_data(data_signature(blocks, tokenizer))  # a resume continues on the same data and tokenizer
    if accelerator.is_main_process:  # only now: bad data leaves --output_dir as it was
        os.makedirs(args.output_dir, exist_ok=True)
    steps_per_epoch = train_order.steps_per_epoch  # None for a stream
    max_steps = args.max_train_steps or (steps_per_epoch or 0) * args.num_train_epochs  # 0: --eval_only of a stream

    # ---- Model and optimizer ----
    set_seed(args.seed)
    with plan.model_init_context(accelerator, config):  # ZeRO-3: each process builds only its shard
        model = build_model(config, args.model_name_or_path, args.seed, args.gradient_checkpointing,
                            args.attn_implementation)
    if plan.init_on_meta:  # the meta device gave each use of a shared tensor its own: share them again
        model.tie_weights()
    if plan.mesh.tp > 1:  # each layer's matmuls split over the tensor-parallel group (FSDP2 then shards the rest)
        apply_tensor_parallel(model, accelerator.torch_device_mesh["tp"])
    flops_per_token = training_flops_per_token(model, args.block_size)  # before sharding hides parameters
    n_params = parameter_count(model)
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, (args.adam_beta1, args.adam_beta2))
    checkpointer.before_prepare(accelerator)  # another process count under DeepSpeed: its universal format
    model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader)
    # accelerate's mixed precision also copies every output to fp32, the whole batch's logits included:
    # take its wrapper off and autocast the forward passes here (the loss upcasts a slice at a time)
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    if plan.init_on_meta:  # FSDP2 from scratch: sharded while empty; each process fills only its shards
        initialize_shards(accelerator.unwrap_model(model, keep_torch_compile=False), args.seed,
                          plan.shard_device(accelerator))
        regroup_parameters(optimizer, model)  # accelerate matched them by storage address, which meta ones lack
    lr_scheduler = build_scheduler(optimizer, args.lr_scheduler_type, args.num_warmup_steps, max_steps, args.min_lr_ratio)
    accelerator.register_for_checkpointing(lr_scheduler)
    accelerator.print(f"model: {n_params / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} MFLOPs/token | "
                      f"data: {describe_data(blocks, train_order, args.block_size)} | {max_steps} steps")
    if args.eval_only:  # measure an existing model through the same data pipeline, then stop
        return evaluate_only(model, eval_dataloader, accelerator, args, blocks, plan.mesh.cp)
    source_names = [b["label"] for b in blocks]

    # ---- Resume or start ----
    can_skip = plan.zero_stage is None  # DeepSpeed's engine has applied the update inside backward
    spikes = SpikeDetector(args.spike_sigma, args.spike_window, args.spike_rollback_outliers or (3 if can_skip else 2),
                           args.spike_rollback_window, can_skip) if args.spike_sigma else None
    state = checkpointer.restore(accelerator, model, train_order, samples_per_step, vars(args), (config, tokenizer),
                                 spikes)
    terminal = sys.stdout.isatty()  # a bar that redraws itself; a log file (SLURM, nohup) gets plain lines
    metrics = TrainingMetrics(accelerator, args.output_dir, args.logging_steps, samples_per_step * args.block_size,
                              flops_per_token, device_peak_flops(accelerator.device, args.peak_flops),
                              resumed_at=state.step if checkpointer.resume_from else None, plain_lines=not terminal,
                              resumed_data_steps=state.data_steps if checkpointer.resume_from else None,
                              loss_copies=plan.mesh.loss_copies)
    accelerator.init_trackers(args.project_name, config=plan.tracker_config(args),
                              init_kwargs=tracker_init_kwargs(args.output_dir, args.run_name))
    if state.initial_eval_loss is None:
        state.initial_eval_loss, by_source = evaluate(model, eval_dataloader, accelerator, source_names, plan.mesh.cp)
        metrics.eval_done(0, state.initial_eval_loss, by_source)
    progress = tqdm(total=max_steps, initial=state.step, disable=not (accelerator.is_local_main_process and terminal),
                    desc="training", file=sys.stdout)  # stderr stays for warnings and errors
    stop = StopSignal(args.ddp_timeout)
    nonfinite = NonFiniteGuard(args.max_nonfinite_steps, loss_scaling=accelerator.mixed_precision == "fp16",
                               scaler=accelerator.scaler)
    eval_loss = None
    offload = ActivationOffloading if args.activation_offloading else contextlib.nullcontext  # to CPU memory
    profiler = StepProfiler(args.profile_steps, args.profile_ranks, accelerator, args.output_dir, args.memory_snapshot)

    # ---- Training loop ----
    model.train()
    metrics.start()  # training time starts here: set-up and the first evaluation are not in it
    averaged_over = plan.mesh.gradient_average * accelerator.gradient_accumulation_steps  # by backward and DDP / FSDP
    # tp / cp ranks share each batch, tp ranks each share of the loss: a sum over processes counts them this often
    batch_copies, loss_copies = plan.mesh.batch_copies, plan.mesh.loss_copies
    while state.step < max_steps:
        train_dataloader.set_epoch(state.epoch)
        for micro_batches in profiler.steps(metrics.steps(train_dataloader, accelerator.gradient_accumulation_steps),
                                            state.step):  # --profile_steps: a trace of the chosen steps
            # The step's loss is the mean over every token it predicts, on all processes and micro-batches
            # (transformers' num_items_in_batch), so how the batch is split never weighs tokens differently.
            predicted = accelerator.reduce(sum((b["labels"][:, 1:] != IGNORE_INDEX).sum() for b in micro_batches))
            predicted = predicted // batch_copies
            step_loss = 0.0  # this process's share of the step's loss
            for batch in micro_batches:
                with accelerator.accumulate(model):  # input_ids, labels (and position_ids: document masking)
                    with context_parallel(accelerator, batch, plan.mesh.cp):  # cp: each rank a part of each sequence
                        # the config's mixed precision; saved activations to the CPU; the parts of a profiled step
                        with accelerator.autocast(), offload(), profiler.region("forward"):
                            loss = model(**batch, use_cache=False, num_items_in_batch=predicted).loss  # sum / predicted
                        with profiler.region("backward"):  # undo the means over micro-batches and processes
                            accelerator.backward(loss * averaged_over)
                    step_loss = step_loss + loss.detach()
                    with profiler.region("optimizer"):
                        if accelerator.sync_gradients:  # the step's last micro-batch; clip to inf = measure the norm
                            grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or math.inf)
                            # a loss spike's outlier (the same verdict on every process) or a non-finite update is skipped
                            spike = spikes.check(state.step + 1, accelerator.reduce(step_loss) / loss_copies,
                                                 grad_norm) if spikes else None
                            finite = nonfinite.step(optimizer, grad_norm, skip=spike is not None and spike["event"] == "skipped")
                        optimizer.zero_grad(set_to_none=True)
                metrics.micro_batch_done(loss)
            lr_scheduler.step()
            state.step_done(samples_per_step)
            progress.update(1)
            nonfinite.record(finite, state.step)
            logged = metrics.step_done(state.step, max_steps, lr=lr_scheduler.get_last_lr()[0], grad_norm=grad_norm,
                                       predicted_tokens=predicted, nonfinite_steps=nonfinite.total,
                                       loss_scale_skips=nonfinite.loss_scale_skips or None, epoch=state.epoch,
                                       spike_skips=spikes and spikes.skipped or None, rollbacks=len(state.rollbacks) or None)
            if logged:
                progress.set_postfix(loss=f"{logged[0]:.3f}", tok_s=f"{logged[1]:.0f}")
            profiler.step_done(state.step)
            if spike:
                metrics.spike(state.step, {**spike, "data_step": state.data_steps})  # where the data that did it is
            if spikes and spikes.sustained:  # back to the newest checkpoint before the spike; its data is skipped
                with metrics.paused():
                    state, rolled = checkpointer.rollback(state, args.max_rollbacks)
                metrics.rolled_back(state, rolled)
                if rolled:  # None: no checkpoint from before the spike, its updates were skipped
                    progress.n = state.step
                    profiler.rolled_back(state.step)
                    continue

            with metrics.paused():  # evaluation and saving are not training time
                if (args.eval_steps and state.step % args.eval_steps == 0) or state.step == max_steps:
                    eval_loss, by_source = evaluate(model, eval_dataloader, accelerator, source_names, plan.mesh.cp)
                    metrics.eval_done(state.step, eval_loss, by_source)
                saved = checkpointer.save(state) if checkpointer.due(state.step) else None
            if stop.agreed(accelerator):  # preemption / Ctrl-C: keep this step, then exit
                save_and_exit(accelerator, checkpointer, state, saved, stop)
            if state.step >= max_steps:
                break
        state.epoch_done()
    progress.close()
    stop.close()
    checkpointer.close()  # old checkpoints deleted in the background

    if eval_loss is None:  # resumed at the end: nothing was trained in this run
        eval_loss, by_source = evaluate(model, eval_dataloader, accelerator, source_names, plan.mesh.cp)
    sources = source_results(blocks, train_order, state, samples_per_step, args.block_size, eval_loss, by_source) \
        if accelerator.is_main_process else None  # only the main process reads a stream: only it knows the draws
    finish(model, tokenizer, accelerator, args, plan, state, eval_loss,
           dict(train_tokens=state.step * samples_per_step * args.block_size, **metrics.summary(),
                eval_tokens=sum(b["eval_tokens"] for b in blocks),
                held_out_tokens=sum(b["held_out_tokens"] for b in blocks),  # of the training data, for evaluation
                nonfinite_steps=nonfinite.total, parameters=n_params, sources=sources,
                parameters_per_process=local_parameter_count(model),  # its shards under FSDP2, TP, ZeRO-3
                spikes=dict(skipped=spikes.skipped, applied=spikes.applied, rollbacks=state.rollbacks) if spikes else None))


def setup(args):
    """Everything that can fail on bad input fails here, before any expensive work; then the Accelerator."""
    plan = preflight(args)  # reconciles flags with the accelerate / DeepSpeed config files
    checkpointer = Checkpointer(args.output_dir, args.checkpointing_steps, args.checkpoints_total_limit,
                                resume=args.resume_from_checkpoint, mesh=plan.mesh)  # a bad --resume_from_checkpoint fails here
    base_config = load_base_config(args)  # a bad model name fails here
    plan.mesh.check_model(base_config or preset_config(args.model_preset, vocab_size=64))  # TP: a plan, sizes that divide
    accelerator = Accelerator(gradient_accumulation_plugin=GradientAccumulationPlugin(  # a step's micro-batches
                                  num_steps=plan.gradient_accumulation_steps, sync_with_dataloader=False),  # come whole
                              log_with=trackers(args.report_to, args.output_dir, args.run_name),
                              project_dir=args.output_dir, kwargs_handlers=plan.kwargs_handlers,
                              dynamo_backend="inductor" if args.torch_compile else None,  # None: the config's
                              dataloader_config=DataLoaderConfiguration(non_blocking=torch.cuda.is_available()))
    plan.apply(accelerator)
    accelerator.print(plan.describe(accelerator))
    return accelerator, plan, checkpointer, base_config


def load_data(args, accelerator, base_config, samples_per_step, mesh, resumed_position=None):
    """(tokenizer, the model config that embeds it, blocks per source, train loader, validation loader,
    the TrainOrder)."""
    stream_reads = None
    if args.streaming:  # each source in parts; this process reads `stream_reads` of them (all: it dispatches)
        args.stream_readers, stream_reads = stream_readers(args.stream_readers, resumed_position, mesh.data_parallel,
                                                           mesh.data_rank(accelerator.process_index),
                                                           samples_per_step, can_dispatch=mesh.batch_copies == 1)
    if args.data_dir:  # written by prepare_data.py: memory-mapped, nothing is read or tokenized here
        tokenizer = store_tokenizer(args.data_dir, args.tokenizer_name or args.model_name_or_path)
        config = model_config(args, base_config, tokenizer)
        blocks = open_blocks(args.data_dir, args.block_size, args.max_eval_samples, args.train_weights,
                             check=accelerator.is_main_process)  # every shard's size: one stat each, once
    else:
        sources = [load_source(s, args.validation_split_percentage, args.streaming) for s in args.sources]
        tokenizer = load_tokenizer(args.tokenizer_name or args.model_name_or_path, args.vocab_size, sources, accelerator,
                                   args.tokenizer_sample_documents)
        config = model_config(args, base_config, tokenizer)  # a tokenizer the model cannot embed fails before tokenizing
        if args.streaming:  # tokenized and packed on the fly while training; only validation blocks are made now
            blocks = stream_blocks(sources, tokenizer, args.block_size, args.stream_shuffle_blocks, args.seed,
                                   args.max_eval_samples, args.validation_split_percentage, args.stream_readers)
        else:  # tokenized once into a token store in the cache, like prepare_data.py's
            blocks = tokenize_and_pack(sources, tokenizer, args.block_size, accelerator, args.max_eval_samples,
                                       args.preprocessing_num_workers)
    loaders = build_dataloaders(blocks, samples_per_step, args.per_device_train_batch_size,
                                args.per_device_eval_batch_size, args.seed, args.dataloader_num_workers,
                                document_masking_eos=tokenizer.eos_token_id if args.document_masking else None,
                                stream_reads=stream_reads, device=accelerator.device)
    return tokenizer, config, blocks, *loaders


def describe_data(blocks, train_order, block_size):
    """'N train blocks (S steps/epoch), V validation blocks of B', and the sources of a mixture."""
    validation = sum(len(b["validation"]) for b in blocks)
    if train_order.steps_per_epoch is None:  # streams, each source in parts
        parts = len(blocks[0]["train"])
        train = f"streamed in {parts} part{'s' if parts > 1 else ''}, " + (
            "each process reading its own" if train_order.each_process_reads else "read on the main process")
    else:
        train = f"{sum(len(b['train']) for b in blocks)} train blocks ({train_order.steps_per_epoch} steps/epoch)"
    if len(blocks) > 1:
        train += f" from {sources_text(blocks)}"
    return f"{train}, {validation} validation blocks of {block_size}"


def source_results(blocks, train_order, state, samples_per_step, block_size, eval_loss, eval_by_source):
    """results.json `sources`: each source's identity, weight, the train tokens drawn from it, its eval loss."""
    samples = state.data_steps * samples_per_step  # read, including what rollbacks skipped
    drawn = [samples] if len(blocks) == 1 else train_order.drawn(samples)
    for rolled in state.rollbacks:  # read, not trained on
        drawn = [n - skipped for n, skipped in zip(drawn, rolled.get("skipped_blocks") or [0] * len(drawn))]
    return [dict(source=b["label"], identity=b["identity"], weight=b["weight"], train_tokens=n * block_size,
                 share=n / max(sum(drawn), 1), eval_loss=eval_by_source.get(b["label"], eval_loss),
                 eval_tokens=b["eval_tokens"], held_out_tokens=b["held_out_tokens"],  # held out: not trained on
                 **({"cleaning": b["cleaning"]} if b.get("cleaning") else {}))  # a token store's, by prepare_data.py
            for b, n in zip(blocks, drawn)]


def save_and_exit(accelerator, checkpointer, state, saved, stop):
    """Preemption or Ctrl-C, agreed by every process: keep the step just done (`saved` if the regular
    schedule saved it already) and exit with EXIT_PREEMPTED, which asks a scheduler to requeue. A save
    that would not end before the job is killed is not started: the last checkpoint stays the newest."""
    signal_name, seconds_left = stop.received or "stop signal", stop.agreed_time_left(accelerator)
    if saved or checkpointer.save_fits(seconds_left):
        path = saved or checkpointer.save(state)
        accelerator.print(f"{signal_name} received: saved {path} after step {state.step}; "
                          "run the same command with --resume_from_checkpoint latest to continue")
    else:
        accelerator.print(f"{signal_name} received after step {state.step}: a save takes up to "
                          f"{checkpointer.save_seconds:.0f} s and {seconds_left:.0f} s are left before the job "
                          "is killed, so none was started; run the same command with --resume_from_checkpoint latest "
                          "to continue from the last checkpoint (save more often, or signal earlier: "
                          "#SBATCH --signal=TERM@SECONDS)")
    record_exit(EXIT_PREEMPTED)  # now: a launcher may kill this process while it waits below
    stop.close()
    checkpointer.close()
    accelerator.end_training()
    sys.exit(EXIT_PREEMPTED)


def finish(model, tokenizer, accelerator, args, plan, state, eval_loss, run_facts):
    """Save a Hugging Face model, results.json, the model card and report, and show a sample."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    set_generation_ids(unwrapped, tokenizer)  # generation_config.json stops at EOS and pads with the tokenizer's ids
    if plan.zero_stage == 3:  # evaluation's prefetch can leave parameters in flight: gathering needs them at rest
        model.empty_partition_cache()
    save_model(unwrapped, args.output_dir)  # every process writes its share: none holds the whole model
    with accelerator.autocast():  # sharded parameters (ZeRO-3, FSDP): every process generates in lock-step
        sample = generate(unwrapped, tokenizer, args.sample_prompt, args.sample_max_new_tokens, seed=args.seed,
                          synced_gpus=plan.sharded_parameters)[0]
    if accelerator.is_main_process:
        tokenizer.save_pretrained(args.output_dir)
        initial = state.initial_eval_loss
        results = dict(initial_eval_loss=initial, eval_loss=eval_loss, perplexity=perplexity(eval_loss),
                       initial_perplexity=perplexity(initial), steps=state.step, **run_facts,
                       sample=sample, **plan.record(accelerator), config=vars(args))
        write_atomic(os.path.join(args.output_dir, "results.json"), json.dumps(results, indent=2))
        print(f"eval perplexity {perplexity(initial):.1f} -> {perplexity(eval_loss):.1f} "
              f"({perplexity(initial - eval_loss):.1f}x lower); model saved to {args.output_dir}")
        print(f"sample: {sample}")
        write_model_card(args.output_dir)  # README.md: the model card of OUTPUT_DIR as a Hub repository
        print(f"report: {write_report(args.output_dir)}")
        if args.push_to_hub:
            print(f"uploaded to {push_to_hub(args.output_dir, args.hub_model_id or args.run_name)}")
    accelerator.end_training()  # last: it tears down the process group
    if accelerator.num_processes > 1:
        # Every file is written and the process group is gone. Skip the interpreter's teardown, where
        # DeepSpeed/gloo background threads sometimes abort a finished run ("terminate called ...").
        record_exit(0)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    run_cli(main)
