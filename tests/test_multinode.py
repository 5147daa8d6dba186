"""Several "nodes" on one machine: the shipped multi-node configs, one and two processes per node,
each node with its own empty HF_HOME (node-local disks) and a shared output directory. They must
train as one run (parity with one process), checkpoint, and resume.

Run alone with `python -m pytest -m distributed`.
"""

import shutil
import subprocess

import pytest

from conftest import ROOT, TINY, _ports, launch, launch_command, results, train_losses

pytestmark = pytest.mark.distributed
LOSS_TOLERANCE = 1e-4  # as in test_distributed.py: summation order only
STEPS = ["--max_train_steps", 6, "--num_warmup_steps", 2, "--eval_steps", 6, "--checkpointing_steps", 3,
         "--weight_decay", 1.0, "--global_batch_size", 8]


def launch_nodes(args, config, per_node, tmp_path, timeout=600, launch_args=()):
    """Both nodes' `accelerate launch` at once, as `srun` starts them; returns their outputs."""
    port, nodes = next(_ports), []
    for rank in (0, 1):
        home = tmp_path / f"node{rank}_hf_home"  # empty and private: node-local caches
        home.mkdir(exist_ok=True)
        cmd, env = launch_command(args, num_processes=2 * per_node, config_file=config, port=port,
                                  extra_env={"HF_HOME": str(home)},
                                  launch_args=["--num_machines", 2, "--machine_rank", rank,
                                               "--main_process_ip", "127.0.0.1", *launch_args])
        log = open(tmp_path / f"node{rank}.log", "w+")
        nodes.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True), log))
    outputs = []
    for process, log in nodes:
        try:
            process.wait(timeout=timeout)
        finally:
            if process.poll() is None:
                process.kill()
        log.seek(0)
        outputs.append(log.read())
        assert process.returncode == 0, f"node failed ({process.returncode}):\n{outputs[-1][-6000:]}"
    return outputs


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("baseline")
    launch(["--train_file", corpus, "--output_dir", out, *TINY, *STEPS, "--per_device_train_batch_size", 8])
    return train_losses(out)


@pytest.mark.parametrize("per_node", [1, 2])
@pytest.mark.parametrize("config, distributed_type", [("multi_node_ddp.yaml", "MULTI_CPU"),
                                                      ("multi_node_zero3.yaml", "DEEPSPEED")])
def test_two_nodes_train_as_one_run_and_resume(config, distributed_type, per_node, tmp_path, corpus, baseline):
    out = tmp_path / "shared_output"
    micro = 4 // per_node  # 2 nodes x per_node processes x micro = 8 sequences, no accumulation
    args = ["--train_file", corpus, "--output_dir", out, *TINY, *STEPS, "--per_device_train_batch_size", micro]
    launch_nodes(args, config, per_node, tmp_path)
    res = results(out)
    assert (res["num_processes"], res["distributed_type"], res["mixed_precision"]) == (2 * per_node, distributed_type, "no")
    assert res["gradient_accumulation_steps"] == 1
    losses = train_losses(out)
    worst = max(abs(losses[s] - baseline[s]) for s in baseline)
    print(f"largest per-step loss difference against one process: {worst:.2e}")
    assert worst < LOSS_TOLERANCE
    # every node trained its own tokenizer into its own cache; they must be the same tokenizer
    tokenizers = sorted(tmp_path.glob("node*_hf_home/clm-train/tokenizers/*/tokenizer.json"))
    assert len(tokenizers) == 2 and tokenizers[0].read_bytes() == tokenizers[1].read_bytes()

    # resume both nodes from the checkpoint at step 3 in the shared output directory
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    args[args.index("--output_dir") + 1] = resumed
    outputs = launch_nodes([*args, "--resume_from_checkpoint", resumed / "checkpoints" / "step_3"], config, per_node,
                           tmp_path)
    assert "resumed from" in outputs[0]
    again = train_losses(resumed)
    assert max(abs(again[s] - losses[s]) for s in range(4, 7)) < 1e-6
