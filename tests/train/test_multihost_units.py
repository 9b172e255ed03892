"""Multi-host building blocks, in one process: settings from flags / environment, which
rows of the global batch each process feeds, data positions across process counts,
splitting task indices over hosts, HF loading that reads only a device's shard, and
writers that stay silent on processes other than 0."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from locations import TOOLS

from mllm_jax.foundation import distributed
from mllm_jax.foundation.distributed import DistributedConfig, DistributedError, process_span
from mllm_jax.foundation.mesh import make_mesh
from mllm_jax.model import hf as hf_module
from mllm_jax.model import init_model, load_hf, preset, save_hf
from mllm_jax.model.sharding import ShardingRules
from mllm_jax.runs.checkpoint import CheckpointMismatchError
from mllm_jax.train.batches import BatchError
from mllm_jax.train.data import (
    ProcessRows,
    check_process_rows,
    process_block,
    restore_positions,
)
from mllm_jax.train.synthetic import SyntheticBatches, SyntheticConfig

# ------------------------------------------------------------------------- settings


def test_settings_from_environment_and_flags():
    env = {
        "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
        "JAX_NUM_PROCESSES": "4",
        "JAX_PROCESS_ID": "3",
        "MLLM_JAX_HEARTBEAT_TIMEOUT": "7",
    }
    config = DistributedConfig.from_env(env)
    assert (config.coordinator, config.num_processes, config.process_id) == ("10.0.0.1:1234", 4, 3)
    assert config.heartbeat_timeout_s == 7 and config.explicit and config.mode == "auto"
    flags = DistributedConfig.from_env(env, process_id=1, coordinator=None)
    assert flags.process_id == 1 and flags.coordinator == "10.0.0.1:1234"  # None = not given
    assert DistributedConfig.from_env({}) == DistributedConfig()
    assert not DistributedConfig().explicit and DistributedConfig().heartbeat_timeout_s == 10


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' is not an integer"),
        ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "process_id 2 is not below"),
        ({"JAX_COORDINATOR_ADDRESS": "host"}, "expected host:port"),
        ({"MLLM_JAX_DISTRIBUTED": "maybe"}, "distributed mode 'maybe'"),
        ({"MLLM_JAX_HEARTBEAT_TIMEOUT": "0"}, "heartbeat_timeout_s must be >= 1"),
    ],
)
def test_bad_settings_name_the_problem(env, message):
    with pytest.raises(DistributedError, match=message):
        DistributedConfig.from_env(env)


def test_initialize_alone_or_refuse_incomplete_settings():
    # Nothing asked for and no cluster here: a single-process run, jax untouched.
    assert distributed.detected_cluster() is None
    assert distributed.initialize(DistributedConfig()) is False
    assert distributed.initialize(DistributedConfig(mode="off", process_id=0)) is False
    with pytest.raises(DistributedError, match="no coordinator address, no number of processes"):
        distributed.initialize(DistributedConfig(process_id=0))
    assert jax.process_count() == 1


def test_host_collectives_in_one_process():
    assert distributed.allgather_json({"a": [1, 2]}) == [{"a": [1, 2]}]
    assert distributed.broadcast_json("sha") == "sha"
    distributed.barrier("nothing to wait for")
    x = np.arange(8.0)
    mesh = make_mesh(1, 8, 1)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    placed = distributed.device_put_global(x, sharding)
    assert placed.sharding == sharding and np.array_equal(np.asarray(placed), x)


# ---------------------------------------------------------------- splitting the work


def test_process_spans_split_a_range_disjointly_in_order():
    for count in (0, 1, 5, 7, 64):
        for processes in (1, 2, 3, 8):
            spans = [
                process_span(100, count, process_index=i, process_count=processes)
                for i in range(processes)
            ]
            assert spans[0][0] == 100 and spans[-1][1] == 100 + count
            assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
            sizes = [hi - lo for lo, hi in spans]
            assert max(sizes) - min(sizes) <= 1
    assert process_span(0, 10) == (0, 10)  # one process: everything
    with pytest.raises(DistributedError, match="process index 2 not in"):
        process_span(0, 10, process_index=2, process_count=2)


def test_synthetic_rows_of_each_process_stack_to_the_global_batch():
    config = SyntheticConfig(batch_size=8, seq_len=48)
    whole = next(SyntheticBatches(config, seed=3))
    parts = [
        next(
            ProcessRows(
                SyntheticBatches(config, seed=3),
                process_block(8, "t", process_index=i, process_count=2),
            )
        )
        for i in range(2)
    ]
    for key, value in whole.items():
        assert np.array_equal(np.concatenate([p[key] for p in parts]), value), key
    with pytest.raises(BatchError, match="global batch size 8 is not divisible by the 3"):
        process_block(8, "stage 'main' data", process_index=0, process_count=3)


def _by_four(device) -> int:
    return device.id // 4  # devices 0-3: "process 0", 4-7: "process 1"


def test_batch_rows_must_be_each_process_own_block():
    check_process_rows(4, make_mesh(2, 2, 2), "t", process_of=_by_four, process_count=2)
    check_process_rows(2, make_mesh(1, 4, 2), "t", process_of=_by_four, process_count=2)
    with pytest.raises(BatchError, match="global batch size 6 .* not divisible by the mesh"):
        check_process_rows(3, make_mesh(2, 2, 2), "t", process_of=_by_four, process_count=2)
    # The batch replicated over the processes (tensor parallelism across hosts): every
    # process would have to feed the same rows.
    with pytest.raises(BatchError, match=r"puts rows 0\.\.3 of the global batch on process 0"):
        check_process_rows(2, make_mesh(1, 1, 8), "t", process_of=_by_four, process_count=2)
    interleaved = [jax.devices()[i] for i in (0, 4, 1, 5, 2, 6, 3, 7)]
    with pytest.raises(BatchError, match=r"puts rows 0\.\.3 of the global batch on process 0"):
        check_process_rows(
            2, make_mesh(1, 2, 4, devices=interleaved), "t", process_of=_by_four, process_count=2
        )
    backwards = make_mesh(2, 2, 2, devices=jax.devices()[4:] + jax.devices()[:4])
    with pytest.raises(BatchError, match="rows 4..7 of the global batch on process 0"):
        check_process_rows(4, backwards, "t", process_of=_by_four, process_count=2)


# ------------------------------------------------------------------- data positions


class _Position:
    position_is_global = False

    def __init__(self):
        self.state = None

    def set_state(self, state):
        self.state = state


class _GlobalPosition(_Position):
    position_is_global = True


def test_data_positions_across_process_counts():
    it = _Position()
    restore_positions(it, [{"p": 0}, {"p": 1}], "ckpt", process_index=1, process_count=2)
    assert it.state == {"p": 1}  # same count: each process its own
    glob = _GlobalPosition()
    restore_positions(glob, [{"i": 4}, {"i": 4}], "ckpt", process_index=0, process_count=1)
    assert glob.state == {"i": 4}  # a global position re-splits over any count
    with pytest.raises(CheckpointMismatchError, match="written by 2 processes and this run has 1"):
        restore_positions(it, [{"p": 0}, {"p": 1}], "ckpt", process_index=0, process_count=1)
    with pytest.raises(CheckpointMismatchError, match="written by 2 processes and this run has 4"):
        restore_positions(glob, [{"i": 4}, {"i": 5}], "ckpt", process_index=0, process_count=4)
    with pytest.raises(CheckpointMismatchError, match="state was not saved"):
        restore_positions(it, [None], "ckpt", process_index=0, process_count=1)


# ------------------------------------------------------------------------ HF weights


def test_load_hf_reads_only_each_device_shard(tmp_path, monkeypatch):
    """On an fsdp=8 mesh each device's block of a sharded weight is read from the file
    on its own: together the reads cover each tensor once, never 8 whole copies."""
    model = init_model(preset("tiny", num_hidden_layers=1), 0)
    path = save_hf(model, tmp_path / "ckpt")
    reads: dict[str, int] = {}
    original = hf_module._SliceReader.__call__

    def counting(self, index):
        block = original(self, index)
        reads[self.what] = reads.get(self.what, 0) + block.size
        return block

    monkeypatch.setattr(hf_module._SliceReader, "__call__", counting)
    mesh = make_mesh(1, 8, 1)
    loaded = load_hf(path, mesh=mesh, rules=ShardingRules.default())
    embed = loaded.embed_tokens.embedding.get_value()
    assert embed.sharding.shard_shape(embed.shape) == (512, 64 // 8)
    assert reads[f"{path}/model.safetensors: tensor 'model.embed_tokens.weight'"] == embed.size
    kernel = loaded.layers[0].mlp.up_proj.kernel.get_value()  # stored transposed
    assert kernel.sharding.shard_shape(kernel.shape) == (64 // 8, 128)
    name = f"{path}/model.safetensors: tensor 'model.layers.0.mlp.up_proj.weight'"
    assert reads[name] == kernel.size
    want = model.layers[0].mlp.up_proj.kernel.get_value()
    assert np.array_equal(np.asarray(kernel), np.asarray(want))


def test_only_process_zero_writes_exports(tmp_path, monkeypatch):
    from mllm_jax.export import save_peft_adapter
    from mllm_jax.model.lora import LoRAConfig, apply_lora

    model = init_model(preset("tiny", num_hidden_layers=1), 0)
    apply_lora(model, LoRAConfig(rank=2), jax.random.key(0))
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert save_hf(model, tmp_path / "merged") == tmp_path / "merged"
    assert save_peft_adapter(model, tmp_path / "adapter") == tmp_path / "adapter"
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary


# ------------------------------------------------------------------- launch scripts

LAUNCH = TOOLS / "launch"


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu_multinode.sh"])
def test_launch_scripts_parse_and_lint(script):
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    done = subprocess.run(["shellcheck", str(LAUNCH / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_tpu_pod_script_runs_one_command_on_every_worker():
    pod = ["--name", "pod", "--zone", "z1", "--type", "v5p-32"]
    run = ["--config", "configs/train_tiny.yaml", "--set", "seed=3", "--sync", "gs://bucket/data"]
    done = subprocess.run(
        ["bash", str(LAUNCH / "tpu_pod.sh"), "--dry-run", *pod, *run, "all"],
        capture_output=True,
        text=True,
        check=True,
        cwd=LAUNCH.parent.parent,
    )
    lines = done.stdout.splitlines()
    assert lines[0].startswith("+ gcloud compute tpus tpu-vm create pod --zone=z1")
    assert "--accelerator-type=v5p-32 --version=v2-alpha-tpuv5" in lines[0]
    ssh_all = [line for line in lines if " ssh pod " in line and "--worker=all" in line]
    assert len(ssh_all) == 4  # unpack, install, sync, train
    train = ssh_all[-1]
    assert "mllm-jax\\ train\\ --config\\ run.yaml\\ --set\\ seed=3" in train
    assert any("scp configs/train_tiny.yaml pod:mllm_jax/run.yaml" in line for line in lines)
    assert lines[-1].endswith(
        "--worker=0 --command=tail\\ -n\\ 200\\ -F\\ \\$HOME/mllm_jax_train.log"
    )
    refused = subprocess.run(
        ["bash", str(LAUNCH / "tpu_pod.sh"), "--name", "pod", "up"], capture_output=True, text=True
    )
    assert refused.returncode == 2 and "--zone (or TPU_ZONE) is required" in refused.stderr


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def test_tpu_pod_generate_gives_each_worker_its_slice(tmp_path):
    """`generate` on a 4-worker slice, with stand-ins: `gcloud ... ssh --worker=all`
    runs the remote command once per worker here, `curl` answers the metadata server for
    that worker, `mllm-jax` records its arguments. Each worker gets its own index."""
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    (home / "mllm_jax" / ".venv" / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    _stub(
        bin_dir / "gcloud",
        'for a in "$@"; do case "$a" in --command=*) cmd="${a#--command=}" ;; esac; done\n'
        'for w in 0 1 2 3; do WORKER=$w bash -c "$cmd" || exit 1; done\n',
    )
    _stub(
        bin_dir / "curl",
        'case "${@: -1}" in\n'
        '  */agent-worker-number) echo -n "$WORKER" ;;\n'
        "  */worker-network-endpoints) echo -n 'w-0,w-1,w-2,w-3' ;;\n"
        "  *) exit 22 ;;\n"
        "esac\n",
    )
    _stub(
        home / "mllm_jax" / ".venv" / "bin" / "mllm-jax",
        'echo "$*" >> "$HOME/calls.txt"\n',
    )
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(home)}
    gen = "--out /shared/corpus --count 1000 --seed 7 --filter"
    command = ["bash", str(LAUNCH / "tpu_pod.sh"), "--name", "pod", "--zone", "z1"]
    done = subprocess.run(
        [*command, "--gen-args", gen, "generate"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    calls = (home / "calls.txt").read_text().splitlines()
    assert calls == [
        f"generate {gen} --process-index {w} --process-count 4 --no-progress" for w in range(4)
    ]
    refused = subprocess.run([*command, "generate"], env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "generate needs --gen-args" in refused.stderr


def test_gpu_script_sets_the_job_from_env_or_slurm():
    def dry(**env):
        return subprocess.run(
            ["bash", str(LAUNCH / "gpu_multinode.sh"), "--config", "run.yaml"],
            env={"PATH": os.environ["PATH"], "DRY_RUN": "1", **env},
            capture_output=True,
            text=True,
        )

    done = dry(COORDINATOR="10.0.0.1:8476", NUM_NODES="2", NODE_RANK="1")
    assert (
        "JAX_COORDINATOR_ADDRESS=10.0.0.1:8476 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1" in done.stdout
    )
    assert done.stdout.splitlines()[-1].strip() == "mllm-jax train --config run.yaml"
    slurm = dry(SLURM_PROCID="3", SLURM_NTASKS="4", COORDINATOR="node0:8476")
    assert "JAX_NUM_PROCESSES=4 JAX_PROCESS_ID=3" in slurm.stdout
    missing = dry(NUM_NODES="2")
    assert missing.returncode == 2 and "set COORDINATOR NODE_RANK" in missing.stderr


def test_a_failed_cluster_detection_is_an_error_where_a_cluster_is_evident(monkeypatch):
    """Under SLURM with several tasks (or on a multi-host TPU VM) a detector that raises
    must not turn the job into independent single-process runs."""
    from jax._src.clusters import ClusterEnv

    class BrokenCluster:
        opt_in_only_method = False

        @staticmethod
        def is_env_present():
            raise RuntimeError("metadata server unreachable")

    monkeypatch.setattr(ClusterEnv, "_cluster_types", [BrokenCluster])
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}
    with pytest.raises(
        DistributedError, match=r"multi-host job \(SLURM\).*BrokenCluster.*unreachable"
    ):
        distributed.detected_cluster(slurm)
    tpu = {"TPU_WORKER_HOSTNAMES": "10.0.0.1,10.0.0.2"}
    with pytest.raises(DistributedError, match="Cloud TPU VM"):
        distributed.detected_cluster(tpu)
    # nothing evident: a failing detector means no cluster
    assert distributed.detected_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    assert distributed.detected_cluster({}) is None
