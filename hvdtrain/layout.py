"""Where this process sits in a job (rank, size, local rank), read from the launcher's variables.

Why read environment variables at all, when MPI and Horovod report the same numbers after
init: a process must pick its GPU (`cuda:<local_rank>`) *before* NCCL or CUDA-aware MPI start,
and the numbers cross-check the library against the launcher: a stale or hand-set variable is
a one-line error here instead of a hang later.

`detect_layout` is pure: it takes a mapping (normally `os.environ`) and reads nothing else.
Sources, first match wins (a launcher started inside another job inherits the outer job's
variables, so the more specific source comes first):

1. Horovod over Gloo (`horovodrun --gloo`, elastic Horovod): HOROVOD_RANK, HOROVOD_SIZE,
   HOROVOD_LOCAL_RANK, HOROVOD_LOCAL_SIZE, when HOROVOD_CONTROLLER=gloo or
   HOROVOD_GLOO_RENDEZVOUS_ADDR is set (otherwise Horovod itself ignores them and uses MPI).
   Launcher "horovodrun-gloo".
2. Open MPI (`mpirun`, and `horovodrun` over MPI, which runs mpirun and sets nothing of its
   own): OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE. Launcher "mpirun".
3. PMI (MPICH / Intel MPI `mpiexec`, `srun --mpi=pmi2`): PMI_RANK, PMI_SIZE, with
   MPI_LOCALRANKID / MPI_LOCALNRANKS. Launcher "pmi", or "srun" when a Slurm step agrees.
4. PMIx (`srun --mpi=pmix`, PRRTE): PMIX_RANK; the size comes from PMI_SIZE or the Slurm
   step. Launcher "pmix", or "srun" when a Slurm step agrees.
5. Slurm job step (`srun`): SLURM_PROCID, SLURM_STEP_NUM_TASKS (else SLURM_NTASKS),
   SLURM_LOCALID, and the tasks on this node from SLURM_STEP_TASKS_PER_NODE (indexed by
   SLURM_STEP_NODEID), else SLURM_TASKS_PER_NODE (by SLURM_NODEID; both like "2(x3),1"), else
   SLURM_NTASKS_PER_NODE (the request, used last because the actual spread may differ).
   Only inside a step (SLURM_STEP_ID set): the batch script itself also has SLURM_PROCID=0
   and SLURM_NTASKS=N, but it is one process. Launcher "srun".
6. Nothing: one process. Launcher "none".

A source without per-host numbers (no local rank / local size) is taken as one host: local
rank = rank. Values no launcher produces (rank >= size, ...) raise ConfigError naming them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

from hvdtrain.errors import ConfigError

LAUNCHERS = ("horovodrun-gloo", "mpirun", "srun", "pmi", "pmix", "none")


@dataclass(frozen=True)
class Layout:
    rank: int
    """This process's index in the job, 0 .. size-1."""
    size: int
    """Processes in the job."""
    local_rank: int
    """Index among the processes on this host: the GPU to use."""
    local_size: int
    """Processes on this host."""
    launcher: str
    """Which source was read: one of LAUNCHERS."""
    variables: tuple[str, ...] = ()
    """The environment variables the numbers came from (for messages)."""

    def describe(self) -> str:
        if self.launcher == "none":
            return "no launcher (one process)"
        return (f"{self.launcher}: rank {self.rank}/{self.size}, local rank "
                f"{self.local_rank}/{self.local_size} (from {', '.join(self.variables)})")


def _int(env: Mapping[str, str], name: str) -> int | None:
    """The variable as a non-negative integer; None if unset; ConfigError if malformed."""
    text = env.get(name)
    if text is None or text.strip() == "":
        return None
    try:
        value = int(text.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"{name}={text!r} is not a non-negative integer; unset it, or start the "
                          f"job with its launcher (mpirun, horovodrun, srun)")
    return value


def _require(env: Mapping[str, str], names: tuple[str, ...], why: str, fix: str) -> list[int]:
    values = [_int(env, n) for n in names]
    missing = [n for n, v in zip(names, values) if v is None]
    if missing:
        raise ConfigError(f"{why} but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                          f"not set; {fix}")
    return [v for v in values if v is not None]


def tasks_per_node(text: str, name: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """Expand Slurm's compressed count list: "2(x3),1" -> [2, 2, 2, 1]."""
    out: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ConfigError(f"{name}={text!r} is not a Slurm task count list like '2(x3),1'; "
                              f"unset it or start the job with srun")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def _slurm_local_size(env: Mapping[str, str]) -> tuple[int, str] | None:
    """Tasks on this node: the step's actual spread first, the job's request last."""
    job_node = _int(env, "SLURM_NODEID") or 0
    step_node = _int(env, "SLURM_STEP_NODEID")
    for name, node in (("SLURM_STEP_TASKS_PER_NODE", job_node if step_node is None else step_node),
                       ("SLURM_TASKS_PER_NODE", job_node)):
        if env.get(name):
            counts = tasks_per_node(env[name], name)
            if node < len(counts):
                return counts[node], name
    per_node = _int(env, "SLURM_NTASKS_PER_NODE")
    return (per_node, "SLURM_NTASKS_PER_NODE") if per_node is not None else None


def _slurm_step(env: Mapping[str, str]) -> Layout | None:
    """The srun task's layout, or None outside a job step."""
    if "SLURM_PROCID" not in env or not (env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")):
        return None
    size_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    rank, size = _require(env, ("SLURM_PROCID", size_var), "SLURM_PROCID is set in a job step",
                          "start the job with srun -n N")
    local_rank = _int(env, "SLURM_LOCALID")
    found = _slurm_local_size(env)
    if local_rank is None or found is None:  # no per-node information: assume one host
        return Layout(rank, size, rank, size, "srun", ("SLURM_PROCID", size_var))
    return Layout(rank, size, local_rank, found[0], "srun",
                  ("SLURM_PROCID", size_var, "SLURM_LOCALID", found[1]))


def _from_pmi(env: Mapping[str, str], slurm: Layout | None) -> Layout | None:
    """MPICH/Intel hydra (PMI_*) or PMIx; reported as srun when the Slurm step agrees."""
    if "PMI_RANK" in env:
        rank, size = _require(env, ("PMI_RANK", "PMI_SIZE"), "PMI_RANK is set",
                              "start the job with mpiexec -n N or srun")
        launcher, names = "pmi", ("PMI_RANK", "PMI_SIZE")
    elif "PMIX_RANK" in env:
        rank = _int(env, "PMIX_RANK") or 0
        size_found = _int(env, "PMI_SIZE")
        if size_found is None and slurm is None:
            raise ConfigError(f"PMIX_RANK={env['PMIX_RANK']} is set but no job size is (PMI_SIZE, "
                              f"OMPI_COMM_WORLD_SIZE or a Slurm step's SLURM_STEP_NUM_TASKS); start "
                              f"the job with mpirun or srun")
        size = size_found if size_found is not None else slurm.size  # type: ignore[union-attr]
        launcher, names = "pmix", ("PMIX_RANK", "PMI_SIZE" if size_found is not None else "SLURM_STEP_NUM_TASKS")
    else:
        return None
    if slurm is not None and (slurm.rank, slurm.size) == (rank, size):
        return slurm  # srun's PMI plugin: Slurm also knows the per-node placement
    local_rank, local_size = _int(env, "MPI_LOCALRANKID"), _int(env, "MPI_LOCALNRANKS")
    if local_rank is None or local_size is None:  # no per-node information: assume one host
        return Layout(rank, size, rank, size, launcher, names)
    return Layout(rank, size, local_rank, local_size, launcher, names + ("MPI_LOCALRANKID", "MPI_LOCALNRANKS"))


def _check(layout: Layout) -> Layout:
    """Reject numbers no real launcher produces: they come from a stale or hand-set variable."""
    v = list(layout.variables) + ["?"] * 4
    rank_v, size_v = v[0], v[1]
    local_v, local_size_v = (v[2], v[3]) if len(layout.variables) >= 4 else (rank_v, size_v)
    fix = ("these variables belong to another job or were set by hand; unset them, or start the job "
           "with its launcher (mpirun -np N, horovodrun -np N, srun -n N)")
    if layout.size < 1:
        raise ConfigError(f"{size_v}={layout.size} must be >= 1; {fix}")
    if layout.rank >= layout.size:
        raise ConfigError(f"{rank_v}={layout.rank} is not below {size_v}={layout.size}; {fix}")
    if layout.local_size < 1 or layout.local_rank >= layout.local_size:
        raise ConfigError(f"{local_v}={layout.local_rank} is not below {local_size_v}={layout.local_size}; {fix}")
    if layout.local_size > layout.size:
        raise ConfigError(f"{local_size_v}={layout.local_size} exceeds {size_v}={layout.size}; {fix}")
    return layout


def _horovod_gloo(env: Mapping[str, str]) -> Layout | None:
    if not (env.get("HOROVOD_CONTROLLER", "").lower() == "gloo" or env.get("HOROVOD_GLOO_RENDEZVOUS_ADDR")):
        return None  # without Gloo, Horovod takes its ranks from MPI and ignores HOROVOD_RANK
    names = ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE")
    rank, size, local_rank, local_size = _require(
        env, names, "Horovod's Gloo controller is selected (HOROVOD_CONTROLLER / HOROVOD_GLOO_RENDEZVOUS_ADDR)",
        "start the job with horovodrun --gloo")
    return Layout(rank, size, local_rank, local_size, "horovodrun-gloo", names)


def _open_mpi(env: Mapping[str, str]) -> Layout | None:
    if not any(k.startswith("OMPI_COMM_WORLD_") for k in env):
        return None
    names = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")
    rank, size = _require(env, names, "Open MPI variables are set", "start the job with mpirun -np N")
    local_rank, local_size = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK"), _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE")
    if local_rank is None or local_size is None:  # no per-node information: assume one host
        return Layout(rank, size, rank, size, "mpirun", names)
    return Layout(rank, size, local_rank, local_size, "mpirun",
                  names + ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"))


def detect_layout(env: Mapping[str, str]) -> Layout:
    """This process's place in the job, from launcher variables (see the module docstring).

    Raises ConfigError, naming the variables, when they are incomplete or inconsistent. Sources
    are read lazily in precedence order, so a malformed variable of a source that lost is ignored.
    """
    sources: tuple[Callable[[Mapping[str, str]], Layout | None], ...] = (
        _horovod_gloo, _open_mpi, lambda e: _from_pmi(e, _slurm_step(e)), _slurm_step)
    for source in sources:
        layout = source(env)
        if layout is not None:
            return _check(layout)
    return Layout(0, 1, 0, 1, "none")


def device_index(layout: Layout, device_count: int, shared_ok: bool = False) -> int | None:
    """The CUDA device this rank should use, or None for CPU (no visible GPU).

    One visible GPU means the launcher already gave each rank its own (Slurm --gpus-per-task,
    a per-rank CUDA_VISIBLE_DEVICES), so it is device 0. Otherwise ranks on a host take GPUs
    by local rank; more ranks than GPUs is refused unless `shared_ok`, because NCCL (Horovod's
    GPU allreduce) fails when two ranks of one communicator use the same GPU.
    """
    if device_count <= 0:
        return None
    if device_count == 1:
        return 0
    if layout.local_size > device_count and not shared_ok:
        raise ConfigError(f"{layout.local_size} ranks run on this host but only {device_count} GPUs are "
                          f"visible; start at most {device_count} ranks per host (-H host:{device_count})")
    return layout.local_rank % device_count
