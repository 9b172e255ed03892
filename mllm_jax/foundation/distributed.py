"""Multi-host runs: starting `jax.distributed`, and the few host-side collectives a run needs.

Every process of a multi-host job runs the same command. Before JAX touches a device,
`initialize(DistributedConfig.from_env(...))` joins the job:

    explicit settings (CLI flags)  >  environment variables  >  cluster auto-detection
    (Cloud TPU pod slices, SLURM, Open MPI, via jax)  >  a single process

Environment variables (the GPU / CPU launch contract; TPU pods need none):

    JAX_COORDINATOR_ADDRESS   host:port of the coordinator service (run by process 0)
    JAX_NUM_PROCESSES         how many processes take part
    JAX_PROCESS_ID            this process, in [0, JAX_NUM_PROCESSES)
    MLLM_JAX_DISTRIBUTED      auto (default) | on | off
    MLLM_JAX_HEARTBEAT_TIMEOUT, MLLM_JAX_SHUTDOWN_TIMEOUT   seconds (defaults 10, 60)

Failure is bounded: a process that dies (SIGKILL, OOM, a lost host) stops sending
heartbeats and every other process aborts within about `heartbeat_timeout_s` (jax's
default is 100 s; ours is 10 s); a process that fails with an exception waits at most
`shutdown_timeout_s` for the others at exit, then aborts, which takes the others down too.

The collectives below (`allgather_json`, `broadcast_json`, `barrier`) exchange small
host values (JSON, hashes) and return at once in a single-process run.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

log = logging.getLogger(__name__)

Mode = Literal["auto", "on", "off"]
_MODES = ("auto", "on", "off")

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_MODE = "MLLM_JAX_DISTRIBUTED"
ENV_HEARTBEAT = "MLLM_JAX_HEARTBEAT_TIMEOUT"
ENV_SHUTDOWN = "MLLM_JAX_SHUTDOWN_TIMEOUT"


class DistributedError(RuntimeError):
    """Multi-host settings that cannot start (or do not describe) a job."""


@dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-host job.

    Attributes:
        mode: "auto" joins when any setting below is given or a cluster is detected,
            else runs alone; "on" always joins (jax detects what is not given, or fails);
            "off" never joins.
        coordinator: "host:port" of process 0's coordinator service.
        num_processes: processes in the job.
        process_id: this process's id, 0 <= process_id < num_processes.
        heartbeat_timeout_s: a process silent this long counts as dead and the job stops.
        shutdown_timeout_s: how long an exiting process waits for the others.
        initialization_timeout_s: how long to wait for every process to connect.
    """

    mode: Mode = "auto"
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout_s: int = 10
    shutdown_timeout_s: int = 60
    initialization_timeout_s: int = 300

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise DistributedError(f"distributed mode {self.mode!r}: expected one of {_MODES}")
        if self.num_processes is not None and self.num_processes < 1:
            raise DistributedError(f"num_processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None and self.process_id < 0:
            raise DistributedError(f"process_id must be >= 0, got {self.process_id}")
        if (
            self.num_processes is not None
            and self.process_id is not None
            and self.process_id >= self.num_processes
        ):
            raise DistributedError(
                f"process_id {self.process_id} is not below num_processes {self.num_processes}"
            )
        if self.coordinator is not None and ":" not in self.coordinator:
            raise DistributedError(f"coordinator {self.coordinator!r}: expected host:port")
        for name in ("heartbeat_timeout_s", "shutdown_timeout_s", "initialization_timeout_s"):
            if getattr(self, name) < 1:
                raise DistributedError(f"{name} must be >= 1 second, got {getattr(self, name)}")

    @property
    def explicit(self) -> bool:
        """Whether any of coordinator / num_processes / process_id is set."""
        return any(v is not None for v in (self.coordinator, self.num_processes, self.process_id))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **explicit: Any) -> DistributedConfig:
        """Settings from `explicit` keyword arguments (None = not given) over `env`
        (default `os.environ`)."""
        env = os.environ if env is None else env
        from_env: dict[str, Any] = {
            "mode": env.get(ENV_MODE) or None,
            "coordinator": env.get(ENV_COORDINATOR) or None,
            "num_processes": _env_int(env, ENV_NUM_PROCESSES),
            "process_id": _env_int(env, ENV_PROCESS_ID),
            "heartbeat_timeout_s": _env_int(env, ENV_HEARTBEAT),
            "shutdown_timeout_s": _env_int(env, ENV_SHUTDOWN),
        }
        unknown = set(explicit) - set(from_env) - {"initialization_timeout_s"}
        if unknown:
            raise TypeError(f"unknown distributed settings {sorted(unknown)}")
        merged = {**from_env, **{k: v for k, v in explicit.items() if v is not None}}
        return cls(**{k: v for k, v in merged.items() if v is not None})


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None


def evident_cluster(env: Mapping[str, str] | None = None) -> str | None:
    """A multi-host environment that the process's variables show without asking anyone:
    a SLURM job of several tasks, or a Cloud TPU VM; None when nothing says so."""
    env = os.environ if env is None else env
    tasks = env.get("SLURM_NTASKS") or env.get("SLURM_STEP_NUM_TASKS")
    if "SLURM_JOB_ID" in env and tasks is not None and tasks.isdigit() and int(tasks) > 1:
        return "SLURM"
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return "Cloud TPU VM (TPU_WORKER_HOSTNAMES)"
    return None


def detected_cluster(env: Mapping[str, str] | None = None) -> str | None:
    """The name of the cluster environment jax would bootstrap from (Cloud TPU VM pod,
    GKE TPU, SLURM, Open MPI), or None. Uses jax's own detectors (an internal API).

    Where the environment evidently is a multi-host job (`evident_cluster`), a detector
    that is missing or fails is an error: falling back to a single process would make
    every host of the job train alone. Elsewhere such a failure means no cluster.
    """
    evident = evident_cluster(env)
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError as err:  # pragma: no cover - depends on the jax version
        if evident is not None:
            raise DistributedError(
                f"this looks like a multi-host job ({evident}), but this jax has no cluster "
                f"detection ({err}); give --coordinator/--num-processes/--process-id"
            ) from err
        return None
    for cluster in ClusterEnv._cluster_types:
        try:
            if not cluster.opt_in_only_method and cluster.is_env_present():
                return cluster.__name__
        except Exception as err:
            if evident is not None:
                raise DistributedError(
                    f"this looks like a multi-host job ({evident}), but jax's "
                    f"{cluster.__name__} detector failed: {type(err).__name__}: {err}; fix "
                    "the environment or give --coordinator/--num-processes/--process-id"
                ) from err
            log.debug("cluster detector %s failed: %s", cluster.__name__, err)
    return None


def initialize(config: DistributedConfig | None = None) -> bool:
    """Joins the multi-host job `config` describes (default: from the environment).

    Must run before any JAX computation. Returns True when `jax.distributed` is running
    (joined now or before), False for a single-process run. Raises DistributedError for
    settings that cannot start a job (e.g. a process id without a process count, and no
    cluster environment to fill it in).
    """
    import jax

    config = config or DistributedConfig.from_env()
    if jax.distributed.is_initialized():
        return True
    if config.mode == "off":
        return False
    missing = [
        what
        for what, value in (
            ("coordinator address", config.coordinator),
            ("number of processes", config.num_processes),
            ("process id", config.process_id),
        )
        if value is None
    ]
    # With every setting given, jax's cluster detection stays off: under SLURM or Open MPI
    # it would otherwise show each process one accelerator (it assumes one process per
    # device), where we run one process per host.
    cluster = detected_cluster() if missing else None
    if config.mode == "auto" and not config.explicit and cluster is None:
        return False
    if missing and cluster is None:
        raise DistributedError(
            f"cannot join a multi-host job: no {', no '.join(missing)} given (flags "
            f"--coordinator/--num-processes/--process-id or {ENV_COORDINATOR}/"
            f"{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID}) and no cluster environment detected"
        )
    log.info(
        "joining a multi-host job: coordinator=%s processes=%s id=%s cluster=%s",
        config.coordinator,
        config.num_processes,
        config.process_id,
        cluster,
    )
    try:
        jax.distributed.initialize(
            coordinator_address=config.coordinator,
            num_processes=config.num_processes,
            process_id=config.process_id,
            cluster_detection_method=None if missing else "deactivate",
            initialization_timeout=config.initialization_timeout_s,
            heartbeat_timeout_seconds=config.heartbeat_timeout_s,
            shutdown_timeout_seconds=config.shutdown_timeout_s,
        )
    except (ValueError, TypeError) as err:
        raise DistributedError(f"cannot join the multi-host job: {err}") from err
    log.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def is_main() -> bool:
    """Whether this is process 0 (the one that writes logs, configs, exports, reports)."""
    import jax

    return jax.process_index() == 0


# ------------------------------------------------------------------ host collectives

# Host collectives go through the coordination service's key-value store and barriers
# (as orbax's do), not through device collectives: a process may arrive much later than
# the others (process 0 hashing a 15 GB base, writing the random base), and XLA:CPU's gloo
# gives up on a peer after 30 s. A dead process still ends the wait: the service stops
# the job when heartbeats stop.
HOST_TIMEOUT_MS = 2 * 60 * 60 * 1000

# Every process makes the same collective calls in the same order (SPMD), so the n-th
# call gets the same sequence number everywhere: it makes each call's keys unique.
_SEQUENCE = itertools.count()


def _client() -> Any:
    from jax._src import distributed as jax_distributed  # the client orbax uses too

    client = jax_distributed.global_state.client
    if client is None:  # pragma: no cover - process_count() > 1 implies a client
        raise DistributedError("jax.distributed is not initialized")
    return client


def _key(name: str) -> str:
    return f"mllm_jax/{next(_SEQUENCE)}/{name}"


def allgather_json(value: Any, name: str = "allgather", timeout_ms: int = HOST_TIMEOUT_MS) -> list:
    """Every process's JSON-able `value`, as a list indexed by process. Collective: every
    process calls it at the same point of the program (`name` labels it in errors)."""
    import jax

    text = json.dumps(value, sort_keys=True)
    if jax.process_count() == 1:
        return [json.loads(text)]
    client, key, index = _client(), _key(name), jax.process_index()
    client.key_value_set(f"{key}/values/{index}", text)
    client.wait_at_barrier(f"{key}/written", timeout_ms)
    entries = dict(client.key_value_dir_get(f"{key}/values/"))
    values = [json.loads(entries[f"{key}/values/{i}"]) for i in range(jax.process_count())]
    client.wait_at_barrier(f"{key}/read", timeout_ms)
    client.key_value_delete(f"{key}/values/{index}")
    return values


def broadcast_json(value: Any, name: str = "broadcast", timeout_ms: int = HOST_TIMEOUT_MS) -> Any:
    """Process 0's JSON-able `value` on every process (collective; the other processes'
    `value` is ignored, pass None)."""
    import jax

    if jax.process_count() == 1:
        return json.loads(json.dumps(value))
    client, key = _client(), _key(name)
    if is_main():
        text = json.dumps(value, sort_keys=True)
        client.key_value_set(key, text)
    else:
        text = client.blocking_key_value_get(key, timeout_ms)
    client.wait_at_barrier(f"{key}/read", timeout_ms)
    if is_main():
        client.key_value_delete(key)
    return json.loads(text)


def barrier(name: str, timeout_ms: int = HOST_TIMEOUT_MS) -> None:
    """Waits until every process reached the barrier `name` (collective)."""
    import jax

    if jax.process_count() > 1:
        _client().wait_at_barrier(_key(name), timeout_ms)


# ------------------------------------------------------------------- array placement


def device_put_global(tree: Any, shardings: Any) -> Any:
    """`jax.device_put(tree, shardings)` that also places values this process holds whole
    (on one of its devices, or on the host) into shardings spanning other processes' devices,
    where `jax.device_put` refuses them. Such a value must be the same on every process
    (it is, e.g., for a model initialised from the same seed everywhere). Typed PRNG keys
    are placed through their key data."""
    import jax

    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def place(x: Any, sharding: Any) -> Any:
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)  # global -> global: a reshard
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = place(jax.random.key_data(x), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, tree, shardings)


# --------------------------------------------------------------- splitting work


def process_span(
    start: int,
    count: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> tuple[int, int]:
    """This process's share [lo, hi) of the indices [start, start + count): the processes'
    shares are disjoint, contiguous, in process order, cover the range, and differ in size
    by at most one (e.g. the task indices each host generates, so that the hosts together
    write one deterministic corpus). Defaults: the running job's index and count."""
    import jax

    index = jax.process_index() if process_index is None else process_index
    total = jax.process_count() if process_count is None else process_count
    if not 0 <= index < total:
        raise DistributedError(f"process index {index} not in [0, {total})")
    if count < 0:
        raise DistributedError(f"count must be >= 0, got {count}")
    base, extra = divmod(count, total)
    lo = start + index * base + min(index, extra)
    return lo, lo + base + (1 if index < extra else 0)
