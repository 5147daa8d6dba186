"""The distributed plan: processes, micro-batch, accumulation, sharding and precision, reconciled
with the accelerate and DeepSpeed config files before any work, and applied to this process.

`accelerate launch` passes its config to the script as ACCELERATE_* environment variables; the
ds_config is a JSON file. Conflicts between them stop here with one line naming both sides,
instead of a DeepSpeed assertion deep in a traceback or a silent override. Every change the plan
makes to the environment or to torch's global state is in `_apply`, with its reason; the changes
that need the Accelerator (the DeepSpeed micro-batch) are in `Plan.apply`.
"""

import contextlib
import json
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
from accelerate import init_empty_weights
from accelerate.utils import InitProcessGroupKwargs

from utils.errors import UserError
from utils.mesh import Mesh, layout
from utils.model import import_model_code


@dataclass
class Plan:
    world_size: int
    micro_batch: int
    block_size: int
    gradient_accumulation_steps: int
    zero_stage: int | None = None
    sharded_parameters: bool = False
    init_on_meta: bool = False  # FSDP2 from scratch: build empty, shard, then fill each shard (utils/model.py)
    kwargs_handlers: list = field(default_factory=list)
    mesh: Mesh = field(default_factory=Mesh)  # the parallelism_config's sizes (utils/mesh.py)

    def samples_per_step(self, accelerator):
        return self.micro_batch * accelerator.gradient_accumulation_steps * self.mesh.data_parallel

    def apply(self, accelerator):
        """Hand DeepSpeed the micro-batch, and fail loudly where accelerate quietly runs something
        other than what was asked for."""
        if accelerator.state.deepspeed_plugin is not None:
            # the train loader has a batch sampler, so accelerate cannot read the micro-batch off it
            accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = self.micro_batch
        if accelerator.num_processes != self.world_size:
            raise UserError(f"accelerate started {accelerator.num_processes} process(es) but the launcher asked for "
                            f"{self.world_size}: on CPU use an accelerate config with distributed_type MULTI_GPU and "
                            "use_cpu true (see accelerate_configs/multi_cpu.yaml)")
        built = accelerator.parallelism_config
        if self.mesh.configured and (built is None or any(getattr(built, f"{name}_size") != size
                                                          for name, size in self.mesh.record().items())):
            raise UserError(f"accelerate did not build the parallelism_config's mesh ({layout(self.mesh.record())}): "
                            "check the accelerate version (>= 1.10) and that the config is an FSDP2 one")
        if accelerator.gradient_accumulation_steps != self.gradient_accumulation_steps:
            raise UserError(f"accelerate uses gradient accumulation {accelerator.gradient_accumulation_steps}, "
                            f"preflight planned {self.gradient_accumulation_steps}: remove gradient_accumulation_steps "
                            "from the accelerate config and use the flags")

    def shard_device(self, accelerator):
        """Where FSDP2 keeps the sharded parameters: the CPU under its offload policy, else the device."""
        from torch.distributed.fsdp import CPUOffloadPolicy

        offloaded = isinstance(accelerator.state.fsdp_plugin.cpu_offload, CPUOffloadPolicy)
        return torch.device("cpu") if offloaded else accelerator.device

    @contextlib.contextmanager
    def model_init_context(self, accelerator, config):
        """Under FSDP2 from scratch, build the model on the meta device (train.py then shards it and
        fills each shard: utils/model.py initialize_shards). Under ZeRO-3, build the model directly
        sharded (zero.Init) only when the config's zero3_init_flag asks for it. accelerate registers every ZeRO-3 config with transformers,
        which then uses zero.Init (and other random draws) even when the flag is false.
        The model's code is imported first, outside zero.Init (utils/model.py import_model_code)."""
        import_model_code(config)
        if self.init_on_meta:  # parameters on the meta device (nothing allocated), buffers for real
            with init_empty_weights(include_buffers=False):
                yield
            return
        plugin = accelerator.state.deepspeed_plugin
        if plugin is None or plugin.zero3_init_flag:
            yield
            return
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            plugin.set_deepspeed_weakref()

    def describe(self, accelerator):
        samples = self.samples_per_step(accelerator)
        ranks = "processes" if self.mesh.data_parallel == accelerator.num_processes else "data-parallel ranks"
        return (f"batch: {self.micro_batch} micro-batch x {accelerator.gradient_accumulation_steps} accumulation x "
                f"{self.mesh.data_parallel} {ranks} = {samples} sequences x {self.block_size} tokens = "
                f"{samples * self.block_size} tokens per optimizer step | {accelerator.distributed_type.value}"
                f"{f' ZeRO-{self.zero_stage}' if self.zero_stage is not None else ''}{self.mesh.describe()}, "
                f"mixed precision {accelerator.mixed_precision}, device {accelerator.device}")

    def record(self, accelerator):
        """What actually ran, for results.json: tests assert it because fallbacks are silent."""
        return dict(num_processes=accelerator.num_processes, distributed_type=accelerator.distributed_type.value,
                    mixed_precision=accelerator.mixed_precision, zero_stage=self.zero_stage,
                    gradient_accumulation_steps=accelerator.gradient_accumulation_steps,
                    global_batch_size=self.samples_per_step(accelerator), micro_batch_size=self.micro_batch,
                    init_on_meta=self.init_on_meta, mesh=self.mesh.record())

    def tracker_config(self, args):
        """The run config as flat scalars (TensorBoard's hparams take no None or lists)."""
        config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
        return {**config, "gradient_accumulation_steps": self.gradient_accumulation_steps,
                "world_size": self.world_size, "zero_stage": str(self.zero_stage)}


def preflight(args, env=os.environ):
    """The distributed plan for this process: checked against the flags and both config files (a
    conflict stops here, in one line), then applied to this process's environment (`_apply`)."""
    world_size = int(env.get("WORLD_SIZE", 1))
    micro = args.per_device_train_batch_size
    deepspeed = env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    fsdp = env.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    ds_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none") if deepspeed else "none"
    ds_file = _existing_path(ds_file) if ds_file != "none" else ds_file
    ds_config = _read_ds_config(ds_file) if ds_file != "none" else {}
    mixed = env.get("ACCELERATE_MIXED_PRECISION", "no")
    mesh = Mesh.from_env(env, world_size)  # HSDP, tensor and context parallelism (utils/mesh.py)
    mesh.check(world_size, fsdp, torch.cuda.is_available(), args)
    accumulation = _gradient_accumulation(args, mesh, env, ds_config, ds_file)
    plan = Plan(world_size=world_size, micro_batch=micro, block_size=args.block_size,
                gradient_accumulation_steps=accumulation, mesh=mesh)
    if deepspeed:
        _check_deepspeed(args, ds_config, ds_file, mixed, micro * accumulation * world_size)
        plan.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 0)))
    plan.sharded_parameters = plan.zero_stage == 3 or fsdp
    plan.init_on_meta = fsdp and not args.model_name_or_path
    if fsdp and env.get("FSDP_VERSION", "1") != "2":
        raise UserError("the FSDP config asks for FSDP1 (fsdp_version 1, accelerate's default), which this script does "
                        "not build or save: set fsdp_version: 2 in it, as accelerate_configs/fsdp.yaml does")
    if not torch.cuda.is_available():
        if fsdp:
            raise UserError("the FSDP config needs GPUs (on CPU accelerate silently trains without sharding): "
                            "use accelerate_configs/multi_cpu.yaml or a DeepSpeed config on CPU")
        if mixed == "fp16":
            raise UserError("mixed_precision fp16 needs a GPU (on CPU accelerate silently runs fp32): "
                            "use 'no' or bf16 in the accelerate config")
    # On CPU accelerate leaves DeepSpeed's backend unset and DeepSpeed then sees one process: name gloo.
    # Otherwise keep the dataclass default "nccl", which accelerate leaves out so it picks per device.
    backend = "gloo" if deepspeed and world_size > 1 and not torch.cuda.is_available() else "nccl"
    plan.kwargs_handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timedelta(seconds=args.ddp_timeout)))
    _apply(plan, args, env, deepspeed, ds_file)
    return plan


def _apply(plan, args, env, deepspeed, ds_file):
    """Every change this run makes to its environment or to torch's global state, each with its reason.

    `accelerate launch` hands its config to the script as ACCELERATE_* variables, which
    `Accelerator()` reads: these are set before it is created."""
    # accelerate lets this variable override Accelerator(gradient_accumulation_steps=...): make it the planned one
    env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] = str(plan.gradient_accumulation_steps)
    # a collective that a dead rank never joins then raises after --ddp_timeout instead of hanging forever (a user's value wins)
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if plan.init_on_meta or plan.mesh.tp > 1:
        # FSDP's rank-0 load and broadcast, off (accelerate's plugin and transformers' from_pretrained read it): from
        # scratch no process has weights to broadcast, each initializes its own shards; a tensor-parallel process
        # holds tp shards, which accelerate would broadcast as whole tensors, so each process loads the pretrained
        # weights and keeps its shards (each process of a node holds the whole model in CPU RAM while loading)
        env["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    if ds_file != "none":
        # the shipped accelerate configs name ds_configs/*.json relative to the repository root:
        # hand accelerate the path that exists, from any working directory
        env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = ds_file
    if deepspeed:
        # DeepSpeed clips inside its engine: hand it --max_grad_norm (accelerate would fill "auto" with 1.0)
        env["ACCELERATE_GRADIENT_CLIPPING"] = str(args.max_grad_norm)
        # accelerate refuses mixed_precision in a YAML that names a ds_config file ("will be ignored"), but it
        # is not ignored: it fills the ds_config's "auto" precision, and _check_deepspeed made sure they agree.
        # So the shipped YAMLs state their precision next to the ds_config that holds the sharding settings.
        fields = env.get("ACCELERATE_CONFIG_DS_FIELDS", "").split(",")
        env["ACCELERATE_CONFIG_DS_FIELDS"] = ",".join(f for f in fields if f != "mixed_precision")
    if not torch.cuda.is_available():
        if plan.world_size > 1 and not deepspeed:
            # accelerate's multi-GPU launcher ignores use_cpu: without this every process would train alone
            env["ACCELERATE_USE_CPU"] = "true"
        share_cores(env)


def share_cores(env):
    """On CPU, `accelerate launch` without --cpu pins every process to one thread: share the cores instead."""
    if env.get("OMP_NUM_THREADS") == "1":
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(env.get("LOCAL_WORLD_SIZE", 1))))


def _existing_path(path):
    in_repository = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)
    return os.path.abspath(path if os.path.exists(path) or os.path.isabs(path) else in_repository)


def _read_ds_config(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read DeepSpeed config {path} ({e}): check deepspeed_config_file in the accelerate config") from e


def _gradient_accumulation(args, mesh, env, ds_config, ds_file):
    micro = args.per_device_train_batch_size
    if args.global_batch_size:  # sequences per step: each data-parallel rank's (tp / cp ranks share theirs)
        per_step = micro * mesh.data_parallel
        ranks = "data-parallel ranks" if mesh.configured else "processes"
        if args.global_batch_size % per_step:
            raise UserError(f"--global_batch_size {args.global_batch_size} is not a multiple of micro-batch {micro} x "
                            f"{mesh.data_parallel} {ranks} = {per_step}: pick a multiple of {per_step}")
        wanted, source = args.global_batch_size // per_step, "--global_batch_size"
    else:
        wanted, source = args.gradient_accumulation_steps, "--gradient_accumulation_steps"
    explicit = args.global_batch_size or args.gradient_accumulation_steps != 1
    for other, name in ((env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS"), "the accelerate config"),
                        (ds_config.get("gradient_accumulation_steps"), ds_file)):
        if other in (None, "auto") or int(other) == wanted:
            continue
        if explicit:
            raise UserError(f"{name} sets gradient_accumulation_steps {other} but {source} gives {wanted}: remove "
                            f"it from {name} (use \"auto\" in a ds_config) or drop the flag")
        wanted = int(other)  # no flag given: the config file's value counts
    return wanted


def _check_deepspeed(args, ds, ds_file, mixed, train_batch_size):
    for key, fix in (("optimizer", "train.py builds AdamW itself"), ("scheduler", "train.py schedules the lr itself")):
        if key in ds:
            raise UserError(f"{ds_file} has an '{key}' section but {fix}: remove it and use the flags")
    for section, precision in (("bf16", "bf16"), ("fp16", "fp16")):
        enabled = ds.get(section, {}).get("enabled", "auto")
        if enabled != "auto" and bool(enabled) != (mixed == precision):
            raise UserError(f"{ds_file} sets {section}.enabled={str(enabled).lower()} but the accelerate config has "
                            f"mixed_precision: {mixed}: set {section}.enabled to \"auto\" in {ds_file}")
    micro = ds.get("train_micro_batch_size_per_gpu", "auto")
    if micro != "auto" and micro != args.per_device_train_batch_size:
        raise UserError(f"{ds_file} sets train_micro_batch_size_per_gpu {micro} but --per_device_train_batch_size is "
                        f"{args.per_device_train_batch_size}: set it to \"auto\" in {ds_file}")
    total = ds.get("train_batch_size", "auto")
    if total != "auto" and total != train_batch_size:
        raise UserError(f"{ds_file} sets train_batch_size {total} but micro-batch x accumulation x processes = "
                        f"{train_batch_size}: set it to \"auto\" in {ds_file} (or use --global_batch_size {total})")
    clipping = ds.get("gradient_clipping", "auto")
    if clipping != "auto" and float(clipping) != args.max_grad_norm:
        raise UserError(f"{ds_file} sets gradient_clipping {clipping} but --max_grad_norm is {args.max_grad_norm}: "
                        f"set it to \"auto\" in {ds_file}")
