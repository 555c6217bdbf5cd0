"""Process topology of one job: who am I (rank), how many are we (world), who is rank 0.

A job runs as one process, or as several that train together with DDP (one per GPU).
The processes can come from three places; ``detect`` reads whichever is present:

* ``accelerate launch`` / ``torchrun``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``/``MASTER_PORT`` are already set (source ``torchrun``);
* submitit (``hydra/launcher=slurm`` or ``local`` with ``tasks_per_node > 1``): every task
  runs the whole Hydra job; ``submitit.JobEnvironment()`` gives the global/local rank, the
  number of tasks and the job's hostnames (source ``submitit``);
* plain ``srun python -m stackllama ...`` inside an allocation: ``SLURM_PROCID``,
  ``SLURM_LOCALID``, ``SLURM_STEP_NUM_TASKS`` and ``SLURM_JOB_NODELIST`` (source ``slurm``;
  ``SLURM_NTASKS`` alone is not trusted: a batch script with ``--ntasks=4`` that runs
  python once must not wait for three processes that never come).

``setup`` exports the torch variables for the last two (rank 0's host as ``MASTER_ADDR``,
a port derived from the job id, ``MASTER_PORT`` wins when set) and initializes the process
group through accelerate's ``PartialState`` (gloo on CPU, NCCL on GPU), the same state the
Hugging Face Trainer then reuses. ``STACKLLAMA_DISTRIBUTED=0`` turns detection off.

``on_main`` runs a function on rank 0 only and hands its result (or its failure) to every
rank through the process group's key-value store, waiting as long as it takes: that is how
the artifact store lets rank 0 wait for another job's file lock, decide build-or-reuse,
and rename the finished folder while the other ranks follow, without collective timeouts.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import random
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Mapping, MutableMapping, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# Stages whose build runs data-parallel across processes: every rank trains, rank 0 alone
# evaluates and saves (SFT, RM), or every rank rolls out and gradients are averaged (PPO).
# The evaluation, and stage=all which ends with it, run in one process and refuse several.
MULTI_PROCESS_STAGES = ("sft", "rm", "ppo")
# How long non-main ranks wait for rank 0 in ``on_main`` (it may wait on another job's lock).
WAIT_ENV = "STACKLLAMA_DIST_WAIT_S"
DEFAULT_WAIT_S = 7 * 24 * 3600.0


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in its job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # single | torchrun | submitit | slurm

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def torch_env(self) -> dict[str, str]:
        """The ``env://`` variables torch.distributed / accelerate read."""
        return {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def port_for(job_id: str) -> int:
    """A port in [20000, 60000) derived from the job id (the same on every task of the job)."""
    return random.Random(str(job_id)).randint(20000, 59999)


def parse_nodelist(nodelist: str) -> list[str]:
    """``gpu[01-03,07],cpu5`` -> ``[gpu01, gpu02, gpu03, gpu07, cpu5]`` (Slurm's compact form)."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
            else:
                hosts.extend(f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
    return hosts


def _int(environ: Mapping[str, str], *names: str, default: int | None = None) -> int | None:
    for name in names:
        if environ.get(name, "") != "":
            return int(environ[name])
    return default


def _from_submitit(environ: Mapping[str, str]) -> DistEnv | None:
    """Inside a submitit job (Slurm or local executor): ``submitit.JobEnvironment()``."""
    executor = environ.get("SUBMITIT_EXECUTOR")
    if not executor or environ is not os.environ:  # JobEnvironment reads the process environment
        return None
    import submitit

    job = submitit.JobEnvironment()
    # the local executor's tasks all run on this machine: loopback, whatever the hostname resolves to
    hosts = ["127.0.0.1"] if executor == "local" else list(job.hostnames)
    local_world = max(job.num_tasks // max(job.num_nodes, 1), 1)
    return _make(
        job.global_rank, job.local_rank, job.num_tasks, local_world, hosts, str(job.job_id), environ, "submitit"
    )


def _from_slurm(environ: Mapping[str, str]) -> DistEnv | None:
    ntasks = _int(environ, "SLURM_STEP_NUM_TASKS")  # set by srun, not in a batch script's own shell
    if ntasks is None or "SLURM_PROCID" not in environ:
        return None
    rank = _int(environ, "SLURM_PROCID", default=0)
    local_rank = _int(environ, "SLURM_LOCALID", default=0)
    nnodes = _int(environ, "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES", default=1)
    hosts = parse_nodelist(environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", ""))
    job_id = f"{environ.get('SLURM_JOB_ID', '0')}.{environ.get('SLURM_STEP_ID', '0')}"
    return _make(rank, local_rank, ntasks, max(ntasks // max(nnodes, 1), 1), hosts, job_id, environ, "slurm")


def _make(rank, local_rank, world, local_world, hosts, job_id, environ, source) -> DistEnv:
    return DistEnv(
        rank=int(rank),
        local_rank=int(local_rank),
        world_size=int(world),
        local_world_size=int(local_world),
        master_addr=environ.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1"),
        master_port=_int(environ, "MASTER_PORT", default=None) or port_for(job_id),
        source=source,
    )


def detect(environ: Mapping[str, str] | None = None) -> DistEnv:
    """This process's place in the job, from the environment only (nothing is initialized)."""
    environ = os.environ if environ is None else environ
    if environ.get("STACKLLAMA_DISTRIBUTED", "1").lower() in ("0", "false", "no", "off"):
        return DistEnv()
    if environ.get("RANK", "") != "" and environ.get("WORLD_SIZE", "") != "":
        world = int(environ["WORLD_SIZE"])
        return DistEnv(
            rank=int(environ["RANK"]),
            local_rank=_int(environ, "LOCAL_RANK", default=0),
            world_size=world,
            local_world_size=_int(environ, "LOCAL_WORLD_SIZE", default=world),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(environ, "MASTER_PORT", default=29500),
            source="torchrun" if world > 1 else "single",
        )
    for source in (_from_submitit, _from_slurm):
        env = source(environ)
        if env is not None and env.world_size > 1:
            return env
    return DistEnv()


def export(env: DistEnv, environ: MutableMapping[str, str] | None = None) -> None:
    """Set the torch ``env://`` variables (those already set are kept)."""
    environ = os.environ if environ is None else environ
    for key, value in env.torch_env().items():
        environ.setdefault(key, value)


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def setup(device: str = "auto", stage: str | None = None) -> DistEnv:
    """Detect the topology; with several processes, export it and join the process group.

    ``device`` is ``cfg.device`` (auto | cpu | cuda): on CPU the group uses gloo, on GPU
    NCCL with this process on ``cuda:<local_rank>``. ``stage`` is checked against the
    stages that train data-parallel.
    """
    env = detect()
    if not env.is_distributed:
        return env
    if stage is not None and stage not in MULTI_PROCESS_STAGES:
        raise ValueError(
            f"stage={stage} runs in one process, but this job has {env.world_size} processes "
            f"({env.source}); run it without accelerate/torchrun, or with tasks_per_node=1. "
            f"Multi-process stages: {', '.join(MULTI_PROCESS_STAGES)}"
        )
    export(env)
    if not _initialized():
        import torch
        from accelerate import PartialState

        cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        state = PartialState(cpu=cpu)
        log.info(
            "Joined process group: rank %d/%d (local %d) via %s, backend %s, master %s:%s",
            env.rank,
            env.world_size,
            env.local_rank,
            env.source,
            state.backend,
            env.master_addr,
            os.environ.get("MASTER_PORT"),
        )
    return current()


def current() -> DistEnv:
    """The initialized process group's rank and size (a single process when there is none)."""
    if not _initialized():
        return DistEnv()
    import torch.distributed as dist

    env = detect()
    return DistEnv(
        rank=dist.get_rank(),
        local_rank=env.local_rank,
        world_size=dist.get_world_size(),
        local_world_size=env.local_world_size,
        master_addr=env.master_addr,
        master_port=env.master_port,
        source=env.source if env.source != "single" else "torchrun",
    )


def is_main() -> bool:
    return current().is_main


def barrier() -> None:
    if _initialized():
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(value: float | int) -> float | int:
    """``value`` summed over every process (itself in a single process)."""
    if not _initialized():
        return value
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    device = PartialState().device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    total = float(tensor.item())
    return int(round(total)) if isinstance(value, int) else total


def all_reduce_mean(value: float) -> float:
    """``value`` averaged over every process."""
    return float(all_reduce_sum(float(value))) / current().world_size


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank: ``[obj]`` alone."""
    if not _initialized():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(stats: Mapping[str, float]) -> dict[str, float]:
    """Per-key mean of every rank's ``stats``; a key some ranks lack averages over those that have it."""
    if not _initialized():
        return dict(stats)
    per_rank = gather_objects(dict(stats))
    keys = list(dict.fromkeys(k for d in per_rank for k in d))
    return {k: sum(d[k] for d in per_rank if k in d) / sum(k in d for d in per_rank) for k in keys}


def broadcast_parameters(params: list[Any]) -> None:
    """Copy rank 0's values of ``params`` to every rank (the same start for data-parallel training)."""
    if not _initialized():
        return
    import torch.distributed as dist

    for p in params:
        dist.broadcast(p.data, src=0)


def average_gradients(params: list[Any]) -> None:
    """All-reduce the mean gradient of ``params`` over ranks, in one flat buffer.

    Written by hand instead of wrapping the model in DDP: DDP's reducer needs every rank to
    run the same backward passes, but PPO skips micro-batches whose probability ratio
    explodes, on one rank and not another. Averaging once per optimizer step keeps the ranks
    in lock-step whatever each skipped (a missing gradient counts as zero).
    """
    if not _initialized():
        return
    import torch
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n


_sequence = itertools.count()


def on_main(fn: Callable[[], T], name: str = "task", timeout_s: float | None = None) -> T:
    """Run ``fn`` on rank 0 only; every rank returns its result (rank 0's exception is
    re-raised on rank 0 and reported as a RuntimeError on the others).

    The others wait on a key of the process group's store, not in a collective, so rank 0
    may take as long as it needs (``STACKLLAMA_DIST_WAIT_S``, default a week); if rank 0
    dies, its store goes with it and the wait fails instead of hanging. Every rank must
    call ``on_main`` the same number of times in the same order (keys are numbered).
    """
    if not _initialized():
        return fn()
    import torch.distributed as dist

    key = f"stackllama/on_main/{next(_sequence)}/{name}"
    store = dist.distributed_c10d._get_default_store()
    if dist.get_rank() == 0:
        try:
            result = fn()
        except BaseException as exc:
            store.set(key, pickle.dumps(("error", f"{type(exc).__name__}: {exc}")))
            raise
        store.set(key, pickle.dumps(("ok", result)))
        return result
    timeout = float(timeout_s if timeout_s is not None else os.environ.get(WAIT_ENV, DEFAULT_WAIT_S))
    store.wait([key], timedelta(seconds=timeout))
    status, value = pickle.loads(store.get(key))
    if status == "error":
        raise RuntimeError(f"rank 0 failed in {name}: {value}")
    return value


def zero3_enabled(trainer: Any) -> bool:
    """Whether ``trainer`` trains under DeepSpeed ZeRO stage 3 (weights partitioned over ranks)."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return False
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and int(plugin.zero_stage or 0) == 3


def trained_model_on_main(trainer: Any, rebuild: Callable[[], Any]) -> Any:
    """The trained model, whole, on rank 0 (None on the other ranks); every rank must call it.

    With DDP or ZeRO-1/2 every rank already holds all the weights: ``trainer.model``. Under
    ZeRO-3 each rank holds a shard, and anything rank 0 does alone with ``trainer.model``
    (a forward pass, a merge) would wait forever for the others' shards. So the ranks gather
    the full state dict onto rank 0 together (``stage3_gather_16bit_weights_on_model_save``
    in conf/accelerate/ds_zero3.json), and rank 0 loads it into ``rebuild()``: the same
    model built fresh, outside DeepSpeed (``from_pretrained`` would otherwise partition it).
    """
    if not zero3_enabled(trainer):
        if not current().is_main:
            return None
        # Under Trainer's bf16/fp16 flags accelerate patched the model's forward with autocast;
        # later scoring, merging and generation choose their own precision.
        from accelerate.utils import extract_model_from_parallel

        return extract_model_from_parallel(trainer.model, keep_fp32_wrapper=False)
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # collective; full on rank 0
    if not current().is_main:
        return None
    from transformers.integrations import deepspeed as hf_ds

    ds_config = getattr(trainer.args, "hf_deepspeed_config", None)
    hf_ds.unset_hf_deepspeed_config()
    try:
        model = rebuild()
    finally:
        if ds_config is not None:
            hf_ds.set_hf_deepspeed_config(ds_config)
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    loaded = {own[k].data_ptr() for k in state if k in own}
    untied_missing = [k for k in own if k not in state and own[k].data_ptr() not in loaded]  # tied ones follow
    if unexpected or untied_missing:
        raise RuntimeError(
            f"ZeRO-3 state dict does not fit the rebuilt model: missing {untied_missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
    return model


__all__ = [
    "DistEnv",
    "MULTI_PROCESS_STAGES",
    "detect",
    "export",
    "setup",
    "current",
    "is_main",
    "barrier",
    "all_reduce_sum",
    "all_reduce_mean",
    "gather_objects",
    "mean_over_ranks",
    "broadcast_parameters",
    "average_gradients",
    "on_main",
    "parse_nodelist",
    "port_for",
    "zero3_enabled",
    "trained_model_on_main",
]
