"""The model axis (utils/mesh.py): HSDP and FSDP2 x tensor parallelism from the shipped accelerate configs,
context parallelism's plumbing and refusals.

The unit tests read the shipped configs, refuse bad layouts in one line, and check the mesh arithmetic
and the tensor-parallel plan on meshes of up to 64 ranks with torch's fake process group (no launches,
as torchtitan tests its parallel dimensions). The launches (`-m distributed`) run the FSDP2 configs on
CPU through tests/cpu_fsdp.py, each asserting the mesh it ran from results.json.
"""

import contextlib
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from transformers import LlamaConfig

from conftest import ROOT, TINY, launch, results, saved_model_eval_loss, train_losses
from test_multinode import launch_nodes
from utils.config import parse_args
from utils.distributed import preflight
from utils.errors import UserError
from utils.loss import IGNORE_INDEX
from utils.mesh import Mesh, context_parallel
from utils.model import LLAMA, build_model, preset_config

CONFIGS = ROOT / "accelerate_configs"
MESH_CONFIGS = ["fsdp_tp.yaml", "multi_node_fsdp_tp.yaml", "multi_node_hsdp.yaml", "fsdp_cp.yaml"]


def env_of(world, **sizes):
    """The environment `accelerate launch` hands train.py for an FSDP2 config with a parallelism_config."""
    return {"WORLD_SIZE": str(world), "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
            "ACCELERATE_USE_PARALLELISM_CONFIG": "true",
            **{f"PARALLELISM_CONFIG_{name.upper()}_SIZE": str(size) for name, size in sizes.items()}}


@pytest.mark.parametrize("name", MESH_CONFIGS)
def test_shipped_mesh_configs_multiply_to_their_process_count_and_fit_the_1b_preset(name):
    config = yaml.safe_load((CONFIGS / name).read_text())
    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2
    sizes = {key.removeprefix("parallelism_config_").removesuffix("_size"): value
             for key, value in config["parallelism_config"].items() if key.endswith("_size")}
    mesh = Mesh(**sizes, configured=True)
    assert mesh.size == config["num_processes"]
    args = parse_args(["--model_preset", "1b", "--block_size", "2048"])
    mesh.check(config["num_processes"], fsdp=True, cuda=True, args=args)  # on GPUs: no refusal
    mesh.check_model(preset_config("1b", 32000))
    sized = [line for line in (CONFIGS / name).read_text().splitlines() if "_size:" in line]
    assert sized and all("#" in line for line in sized)  # every size says what it is


@pytest.mark.parametrize("world, sizes, message", [
    (4, dict(dp_shard=4, tp=2), "= 8 processes but the launch has 4"),
    (4, dict(dp_replicate=4), "replicates without sharding, which is DDP"),
    (4, dict(), "replicates without sharding, which is DDP"),  # all sizes 1: accelerate replicates
    (2, dict(tp=2), "leaves FSDP2 nothing to shard over"),
    (4, dict(dp_shard=2, cp=2), "context parallelism needs GPUs"),
    (4, dict(dp_shard=2, sp=2), "DeepSpeed's sequence parallelism"),
])
def test_bad_layouts_are_refused_in_one_line_before_any_work(world, sizes, message):
    with pytest.raises(UserError, match=message) as refused:
        preflight(parse_args([]), env=env_of(world, **sizes))
    assert "\n" not in str(refused.value)


def test_a_mesh_needs_an_fsdp2_config():
    env = {**env_of(4, dp_shard=2, tp=2), "ACCELERATE_USE_FSDP": "false"}
    with pytest.raises(UserError, match="needs FSDP2"):
        preflight(parse_args([]), env=env)


@pytest.mark.parametrize("flags, message", [
    (["--attn_implementation", "eager"], "shards sdpa attention, not eager"),
    (["--block_size", "34"], "not a multiple of 2 x cp_size = 4"),
    (["--document_masking"], "drop --document_masking"),
])
def test_context_parallel_refusals(flags, message):
    with pytest.raises(UserError, match=message):
        Mesh(dp_shard=2, cp=2, configured=True).check(4, fsdp=True, cuda=True, args=parse_args(["--block_size", "32",
                                                                                                  *flags]))


@pytest.mark.parametrize("config, tp, message", [
    (preset_config("gpt2-tiny", 512), 2, "GPT2 models have no tensor-parallel plan"),
    (preset_config("tiny", 512), 8, "num_attention_heads = 4 is not divisible by tp_size 8"),
    (preset_config("1b", 512), 16, "num_key_value_heads = 8 is not divisible by tp_size 16"),  # 32 heads divide
    (LlamaConfig(**{**LLAMA["tiny"], "intermediate_size": 191}), 2, "intermediate_size = 191"),
    (LlamaConfig(**LLAMA["tiny"], tie_word_embeddings=True), 2, "ties its output layer to its input embeddings"),
])
def test_tensor_parallel_needs_a_plan_and_sizes_that_divide(config, tp, message):
    with pytest.raises(UserError, match=message):
        Mesh(dp_shard=2, tp=tp, configured=True).check_model(config)


def test_the_global_batch_counts_data_parallel_ranks_not_processes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on GPUs: FSDP is not refused
    args = parse_args(["--global_batch_size", "32", "--per_device_train_batch_size", "4"])
    plan = preflight(args, env=env_of(8, dp_shard=2, tp=4))  # 2 data-parallel ranks x 4 x 4 accumulation
    assert plan.gradient_accumulation_steps == 4 and plan.mesh.data_parallel == 2
    assert (plan.mesh.gradient_average, plan.mesh.batch_copies, plan.mesh.loss_copies) == (2, 4, 4)
    with pytest.raises(UserError, match="micro-batch 4 x 2 data-parallel ranks = 8"):
        preflight(parse_args(["--global_batch_size", "12", "--per_device_train_batch_size", "4"]),
                  env=env_of(8, dp_shard=2, tp=4))
    cp = Mesh(dp_replicate=2, dp_shard=2, cp=2, configured=True)
    assert (cp.data_parallel, cp.gradient_average, cp.batch_copies, cp.loss_copies) == (4, 8, 2, 1)


FAKE_MESHES = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from accelerate import init_empty_weights
    from accelerate.parallelism_config import ParallelismConfig
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import AutoModelForCausalLM
    sys.path.insert(0, {root!r})
    from utils.mesh import Mesh, apply_tensor_parallel
    from utils.model import preset_config

    out = {{"ranks": [], "shapes": None}}
    for sizes in ({{"dp_replicate": 4, "dp_shard": 8, "tp": 2}}, {{"dp_shard": 8, "tp": 8}},
                  {{"dp_replicate": 8, "dp_shard": 8}}, {{"dp_replicate": 2, "dp_shard": 8, "cp": 4}}):
        for rank in (0, 1, 9, 17, 42, 63):
            dist.init_process_group("fake", rank=rank, world_size=64, store=FakeStore())
            mesh = ParallelismConfig(**{{f"{{k}}_size": v for k, v in sizes.items()}}).build_device_mesh("cpu")
            ours = Mesh(**sizes, configured=True)
            tp_group = sorted(dist.get_process_group_ranks(mesh["tp"].get_group())) if "tp" in sizes else [rank]
            out["ranks"].append(dict(sizes=sizes, rank=rank, ours=[ours.data_rank(rank), ours.data_parallel],
                                     mesh=[mesh["dp"].get_local_rank(), mesh["dp"].size()], tp_group=tp_group))
            if sizes == {{"dp_shard": 8, "tp": 8}} and rank == 42:  # the 1b preset on tp 8, on the meta device
                with init_empty_weights(include_buffers=False):
                    model = AutoModelForCausalLM.from_config(preset_config("1b", 32000))
                apply_tensor_parallel(model, mesh["tp"])
                assert all(isinstance(p, DTensor) for p in model.parameters())
                out["shapes"] = {{n: list(p.to_local().shape) for n, p in model.named_parameters() if ".0." in n}}
            dist.destroy_process_group()
    print(json.dumps(out))
""")


def test_mesh_arithmetic_and_the_tensor_parallel_plan_on_64_ranks_with_a_fake_process_group():
    """accelerate's own mesh (tp innermost) agrees with utils/mesh.py on every rank's data-parallel rank;
    a tensor-parallel group is 8 consecutive ranks or fewer (one node of 8 GPUs); the 1b preset's
    heads and MLP split 8 ways."""
    run = subprocess.run([sys.executable, "-c", FAKE_MESHES.format(root=str(ROOT))], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for case in out["ranks"]:
        assert case["ours"] == case["mesh"], case
        group = case["tp_group"]
        assert group == list(range(group[0], group[0] + len(group))) and group[0] // 8 == group[-1] // 8, case
    config = LLAMA["1b"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    shapes = out["shapes"]
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == [config["hidden_size"] // 8, config["hidden_size"]]
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == [config["num_key_value_heads"] * head_dim // 8,
                                                                config["hidden_size"]]
    assert shapes["model.layers.0.mlp.down_proj.weight"] == [config["hidden_size"], config["intermediate_size"] // 8]
    assert shapes["model.layers.0.input_layernorm.weight"] == [config["hidden_size"]]  # replicated


class RecordingAccelerator:
    def maybe_context_parallel(self, buffers, buffer_seq_dims, no_restore_buffers):
        self.buffers, self.dims, self.kept = buffers, buffer_seq_dims, no_restore_buffers
        return contextlib.nullcontext()


def test_context_parallel_shifts_labels_before_the_split_and_the_loss_is_unchanged():
    """The inputs context parallelism splits give the same loss unsplit: labels shifted once over the
    whole sequence (utils/loss.py reads shift_labels), explicit positions."""
    torch.manual_seed(0)
    model = build_model(preset_config("tiny", 512), seed=0)
    input_ids = torch.randint(0, 512, (2, 16))
    plain = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    batch = {"input_ids": input_ids, "labels": input_ids}
    accelerator = RecordingAccelerator()
    with context_parallel(accelerator, batch, cp=2):
        split_ready = model(**batch, use_cache=False).loss
    assert torch.equal(plain, split_ready)
    assert all(b is batch[k] for b, k in zip(accelerator.buffers, ("input_ids", "labels", "shift_labels", "position_ids")))
    assert len({id(b) for b in accelerator.buffers}) == 4 and accelerator.dims == [1, 1, 1, 1]  # each split once
    assert torch.equal(batch["shift_labels"][:, :-1], input_ids[:, 1:])
    assert (batch["shift_labels"][:, -1] == IGNORE_INDEX).all()
    assert torch.equal(batch["position_ids"][1], torch.arange(16))
    assert context_parallel(accelerator, {"input_ids": input_ids}, cp=1).__class__.__name__ == "nullcontext"


# ---- launches: the FSDP2 configs on CPU (tests/cpu_fsdp.py), -m distributed ----

STEPS = ["--max_train_steps", 8, "--num_warmup_steps", 2, "--checkpointing_steps", 4, "--weight_decay", 1.0,
         "--global_batch_size", 8]
LOSS_TOLERANCE = 1e-4  # fp32; only the order of sums differs (row-parallel matmuls add partial products)


def sizes(**sizes):
    """accelerate launch's flags that override the config's parallelism_config sizes."""
    return [flag for name, size in sizes.items() for flag in (f"--parallelism_config_{name}_size", size)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("one")
    launch(["--train_file", corpus, "--output_dir", out, *TINY, *STEPS, "--per_device_train_batch_size", 8])
    return out


def run_mesh(out, corpus, config, processes, micro, launch_args, extra=()):
    launch(["--train_file", corpus, "--output_dir", out, *TINY, *STEPS, "--per_device_train_batch_size", micro, *extra],
           num_processes=processes, config_file=config, launch_args=launch_args)
    return results(out)


def resume_from_step_4(run_dir, tmp_path, name, corpus, config, processes, micro, launch_args=(), extra=()):
    """(the resumed run's losses, its output)"""
    again = tmp_path / name
    shutil.copytree(run_dir, again)
    shutil.rmtree(again / "checkpoints" / "step_8")
    run = launch(["--train_file", corpus, "--output_dir", again, *TINY, *STEPS, "--per_device_train_batch_size", micro,
                  "--resume_from_checkpoint", "latest", *extra], num_processes=processes, config_file=config,
                 launch_args=launch_args)
    return train_losses(again), run.stdout


def shard_of(res, whole, ways):
    """The main process holds 1/ways of the parameters (its shards are rounded up where a size does not divide)."""
    return 1 <= res["parameters_per_process"] / (whole["parameters"] / ways) < 1.01


def assert_same_losses(losses, reference, steps=None):
    steps = steps or sorted(reference)
    worst = max(abs(losses[s] - reference[s]) for s in steps)
    print(f"largest per-step loss difference: {worst:.2e}")
    assert worst < LOSS_TOLERANCE


@pytest.mark.distributed
def test_fsdp2_x_tensor_parallel_trains_as_one_process_saves_and_resumes_on_any_mesh(tmp_path, corpus, one_process):
    out = tmp_path / "tp"
    res = run_mesh(out, corpus, "fsdp_tp.yaml", 4, 4, sizes(dp_shard=2))
    assert (res["num_processes"], res["distributed_type"]) == (4, "FSDP")
    assert res["mesh"] == {"dp_replicate": 1, "dp_shard": 2, "tp": 2, "cp": 1} and res["global_batch_size"] == 8
    whole = results(one_process)
    assert shard_of(res, whole, 4)  # sharded over tp and dp_shard
    losses, reference = train_losses(out), train_losses(one_process)
    assert_same_losses(losses, reference)
    assert abs(res["eval_loss"] - whole["eval_loss"]) < LOSS_TOLERANCE  # each validation block counted once
    # the final save is an ordinary model with full weights: it reloads to the same eval loss
    assert abs(saved_model_eval_loss(out, corpus) - saved_model_eval_loss(one_process, corpus)) < LOSS_TOLERANCE
    # exact resume on the same mesh, and onto others: FSDP2 alone on 4 processes, and one process
    same, output = resume_from_step_4(out, tmp_path, "same", corpus, "fsdp_tp.yaml", 4, 4, sizes(dp_shard=2))
    assert max(abs(same[s] - losses[s]) for s in range(5, 9)) < 1e-6 and "notice" not in output
    for name, config, processes, micro in (("dp4", "fsdp.yaml", 4, 2), ("one", "fsdp.yaml", 1, 8)):
        other, output = resume_from_step_4(out, tmp_path, name, corpus, config, processes, micro)
        assert_same_losses(other, losses, range(5, 9))
        assert f"saved by 4 processes (dp_shard 2 x tp 2), this run has {processes} (data parallel)" in output


@pytest.mark.distributed
def test_hsdp_on_one_machine_trains_as_one_process(tmp_path, corpus, one_process):
    out = tmp_path / "hsdp"
    res = run_mesh(out, corpus, "multi_node_hsdp.yaml", 4, 2, [*sizes(dp_replicate=2, dp_shard=2),
                                                               "--main_process_ip", "127.0.0.1", "--machine_rank", 0])
    assert res["mesh"] == {"dp_replicate": 2, "dp_shard": 2, "tp": 1, "cp": 1} and res["num_processes"] == 4
    assert shard_of(res, results(one_process), 2)  # sharded in 2, replicated twice
    assert_same_losses(train_losses(out), train_losses(one_process))


@pytest.mark.distributed
def test_hsdp_on_two_nodes_trains_as_one_process_and_resumes(tmp_path, corpus, one_process):
    out = tmp_path / "shared_output"
    args = ["--train_file", corpus, "--output_dir", out, *TINY, *STEPS, "--per_device_train_batch_size", 2]
    launch_nodes(args, "multi_node_hsdp.yaml", 2, tmp_path, launch_args=sizes(dp_replicate=2, dp_shard=2))
    res = results(out)
    assert res["mesh"] == {"dp_replicate": 2, "dp_shard": 2, "tp": 1, "cp": 1} and res["num_processes"] == 4
    losses = train_losses(out)
    assert_same_losses(losses, train_losses(one_process))
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_8")
    args[args.index("--output_dir") + 1] = resumed
    launch_nodes([*args, "--resume_from_checkpoint", "latest"], "multi_node_hsdp.yaml", 2, tmp_path,
                 launch_args=sizes(dp_replicate=2, dp_shard=2))
    again = train_losses(resumed)
    assert max(abs(again[s] - losses[s]) for s in range(5, 9)) < 1e-6


def test_evaluation_counts_each_block_once_however_many_processes_computed_it():
    """Tensor-parallel ranks compute the same blocks, and the loader pads the last batches to even ones:
    gathered, a block appears several times, and is counted once."""
    from train import evaluate
    from utils.data import Collate

    model = build_model(preset_config("tiny", 512), seed=0)
    blocks = [torch.randint(0, 512, (16,), generator=torch.Generator().manual_seed(i)) for i in range(5)]
    batches = [Collate()([{"input_ids": blocks[i], "source": i % 2, "block": i} for i in numbers])
               for numbers in ([0, 1], [2, 3], [4, 0])]  # block 0 again: padding to an even last batch

    class Accelerator:
        def __init__(self, copies):
            self.copies = copies

        def gather(self, x):  # every tensor-parallel rank's copy
            return torch.cat([x] * self.copies)

        autocast = staticmethod(contextlib.nullcontext)

    once = evaluate(model, [{k: v[:1] if i == 2 else v for k, v in b.items()} for i, b in enumerate(batches)],
                    Accelerator(1), ["a", "b"])
    loss, by_source = evaluate(model, batches, Accelerator(2), ["a", "b"])
    assert loss == pytest.approx(once[0], rel=1e-6) and by_source == pytest.approx(once[1], rel=1e-6)


@pytest.mark.distributed
def test_a_pretrained_model_continues_training_under_tensor_parallelism(tmp_path, corpus, one_process):
    """--model_name_or_path: every process loads the weights and keeps its tp shards (accelerate's rank-0
    broadcast would send a rank's shards as whole tensors), and continued training matches one process."""
    common = ["--train_file", corpus, *TINY, *STEPS, "--model_name_or_path", one_process, "--max_train_steps", 4]
    launch([*common, "--output_dir", tmp_path / "one", "--per_device_train_batch_size", 8])
    launch([*common, "--output_dir", tmp_path / "tp", "--per_device_train_batch_size", 4], num_processes=4,
           config_file="fsdp_tp.yaml", launch_args=sizes(dp_shard=2))
    assert results(tmp_path / "tp")["mesh"]["tp"] == 2
    assert_same_losses(train_losses(tmp_path / "tp"), train_losses(tmp_path / "one"))


@pytest.mark.distributed
def test_streams_under_tensor_parallelism_each_data_parallel_rank_reads_its_own_part_and_resume(tmp_path, corpus):
    """--streaming: the 2 data-parallel ranks each read one part of the stream, their tp ranks get the same
    batches; the losses are one process's reading the same 2 parts, and a resume from step 4 repeats them."""
    common = ["--train_file", corpus, *TINY, *STEPS, "--streaming"]
    launch([*common, "--output_dir", tmp_path / "one", "--per_device_train_batch_size", 8, "--stream_readers", 2])
    out = tmp_path / "tp"
    run = launch([*common, "--output_dir", out, "--per_device_train_batch_size", 4], num_processes=4,
                 config_file="fsdp_tp.yaml", launch_args=sizes(dp_shard=2))
    assert "streamed in 2 parts, each process reading its own" in run.stdout
    losses = train_losses(out)
    assert_same_losses(losses, train_losses(tmp_path / "one"))
    again, _ = resume_from_step_4(out, tmp_path, "again", corpus, "fsdp_tp.yaml", 4, 4, sizes(dp_shard=2),
                                  ["--streaming"])
    assert max(abs(again[s] - losses[s]) for s in range(5, 9)) < 1e-6


def test_under_tensor_parallelism_every_data_parallel_rank_reads_its_own_stream_parts():
    from utils.stream import stream_readers

    assert stream_readers(None, None, 2, 1, 8, can_dispatch=False) == (2, range(1, 2))
    with pytest.raises(UserError, match="give --stream_readers a multiple of 2"):
        stream_readers(3, None, 2, 0, 12, can_dispatch=False)
    with pytest.raises(UserError, match="resume on a mesh whose data-parallel ranks divide 1"):
        stream_readers(None, {"drawn": [0], "readers": 1}, 2, 0, 8, can_dispatch=False)
    assert stream_readers(3, None, 2, 0, 12) == (3, range(3))  # without tp / cp the main process dispatches


@pytest.mark.distributed
def test_an_fsdp2_checkpoint_resumes_onto_a_tensor_parallel_mesh(tmp_path, corpus):
    """DCP reshards into TP too: FSDP2 on 4 processes, checkpoint at step 4, resumed as tp 2 x dp_shard 2."""
    out = tmp_path / "fsdp"
    run_mesh(out, corpus, "fsdp.yaml", 4, 2, [])
    losses = train_losses(out)
    again, output = resume_from_step_4(out, tmp_path, "tp", corpus, "fsdp_tp.yaml", 4, 4, sizes(dp_shard=2))
    assert "saved by 4 processes (data parallel), this run has 4 (dp_shard 2 x tp 2)" in output
    assert_same_losses(again, losses, range(5, 9))
