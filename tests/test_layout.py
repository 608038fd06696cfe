"""detect_layout over the environments real launchers produce (and broken ones): plain pytest."""
from __future__ import annotations

import pytest

from hvdtrain.config import ConfigError
from hvdtrain.layout import Layout, detect_layout, device_index, tasks_per_node

# What `horovodrun --gloo -np 2 -H localhost:2` gives rank 1 (recorded on this machine).
GLOO = {"HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo", "HOROVOD_CROSS_RANK": "0",
        "HOROVOD_CROSS_SIZE": "1", "HOROVOD_GLOO_IFACE": "lo", "HOROVOD_GLOO_RENDEZVOUS_ADDR": "127.0.0.1",
        "HOROVOD_GLOO_RENDEZVOUS_PORT": "56293", "HOROVOD_HOSTNAME": "localhost", "HOROVOD_LOCAL_RANK": "1",
        "HOROVOD_LOCAL_SIZE": "2", "HOROVOD_RANK": "1", "HOROVOD_SIZE": "2"}
# What `mpirun -np 2` (and `horovodrun --mpi`, which runs it) gives rank 1 (Open MPI 4.1).
OMPI = {"OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_NODE_RANK": "1",
        "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_UNIVERSE_SIZE": "2",
        "PMIX_RANK": "1", "PMIX_NAMESPACE": "88080385"}
# The batch script of `sbatch -N2 -n6`: one process, but Slurm's job variables are present.
BATCH = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "6", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
         "SLURM_NODEID": "0", "SLURM_TASKS_PER_NODE": "3(x2)", "SLURM_JOB_NUM_NODES": "2"}
# Task 4 of `srun -N2 -n6` inside that job: second node, second task there.
SRUN = {**BATCH, "SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_STEP_NUM_TASKS": "6",
        "SLURM_STEP_TASKS_PER_NODE": "3(x2)", "SLURM_PROCID": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
        "SLURM_STEP_NODEID": "1"}
# MPICH / Intel MPI hydra `mpiexec -n 4` with 2 per host, rank 3.
HYDRA = {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2", "PMI_FD": "5"}


def L(rank: int, size: int, local_rank: int, local_size: int, launcher: str) -> tuple:
    return (rank, size, local_rank, local_size, launcher)


def key(layout: Layout) -> tuple:
    return (layout.rank, layout.size, layout.local_rank, layout.local_size, layout.launcher)


@pytest.mark.parametrize("env,expected", [
    ({}, L(0, 1, 0, 1, "none")),
    ({"PATH": "/usr/bin", "HOME": "/root"}, L(0, 1, 0, 1, "none")),
    (GLOO, L(1, 2, 1, 2, "horovodrun-gloo")),
    ({**GLOO, "HOROVOD_CONTROLLER": ""}, L(1, 2, 1, 2, "horovodrun-gloo")),  # rendezvous address alone
    (OMPI, L(1, 2, 1, 2, "mpirun")),
    ({**OMPI, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}, L(0, 2, 0, 2, "mpirun")),
    # two hosts x 4: rank 6 is local rank 2 on the second host
    ({"OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, L(6, 8, 2, 4, "mpirun")),
    # no local variables: assume one host
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "3"}, L(1, 3, 1, 3, "mpirun")),
    (BATCH, L(0, 1, 0, 1, "none")),
    (SRUN, L(4, 6, 1, 3, "srun")),
    ({**SRUN, "SLURM_STEP_ID": "", "SLURM_STEPID": "0"}, L(4, 6, 1, 3, "srun")),  # old variable name only
    # uneven spread "2(x2),1": the third node runs one task
    ({**SRUN, "SLURM_STEP_NUM_TASKS": "5", "SLURM_STEP_TASKS_PER_NODE": "2(x2),1", "SLURM_PROCID": "4",
      "SLURM_LOCALID": "0", "SLURM_STEP_NODEID": "2", "SLURM_NODEID": "2"}, L(4, 5, 0, 1, "srun")),
    # a step on a subset of the job's nodes: the step's own node index counts
    ({**SRUN, "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_PROCID": "1",
      "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_NODEID": "0"}, L(1, 2, 1, 2, "srun")),
    # only the requested per-node count
    ({"SLURM_STEP_ID": "3", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
      "SLURM_NTASKS_PER_NODE": "2"}, L(3, 4, 1, 2, "srun")),
    # no per-node information: one host
    ({"SLURM_STEP_ID": "3", "SLURM_PROCID": "2", "SLURM_NTASKS": "4"}, L(2, 4, 2, 4, "srun")),
    (HYDRA, L(3, 4, 1, 2, "pmi")),
    ({"PMI_RANK": "2", "PMI_SIZE": "3"}, L(2, 3, 2, 3, "pmi")),
    # srun --mpi=pmi2 / pmix: Slurm agrees on rank and size, so srun is the launcher
    ({**SRUN, "PMI_RANK": "4", "PMI_SIZE": "6", "PMI_FD": "7"}, L(4, 6, 1, 3, "srun")),
    ({**SRUN, "PMIX_RANK": "4", "PMIX_NAMESPACE": "slurm.pmix.7.0"}, L(4, 6, 1, 3, "srun")),
    ({"PMIX_RANK": "1", "PMI_SIZE": "2"}, L(1, 2, 1, 2, "pmix")),
    # MPICH's mpiexec inside an sbatch script: the batch variables must not win
    ({**BATCH, **HYDRA}, L(3, 4, 1, 2, "pmi")),
    # Open MPI's mpirun inside an srun step (or an sbatch script): the inner launcher wins
    ({**SRUN, **OMPI}, L(1, 2, 1, 2, "mpirun")),
    ({**BATCH, **OMPI}, L(1, 2, 1, 2, "mpirun")),
    # horovodrun --gloo started from inside an mpirun rank: the Gloo job is the one Horovod joins
    ({**OMPI, **GLOO, "HOROVOD_RANK": "0", "HOROVOD_LOCAL_RANK": "0"}, L(0, 2, 0, 2, "horovodrun-gloo")),
    # HOROVOD_* without Gloo: Horovod's MPI controller ignores them, and so do we
    ({**OMPI, "HOROVOD_RANK": "0", "HOROVOD_SIZE": "4"}, L(1, 2, 1, 2, "mpirun")),
    ({"HOROVOD_RANK": "0", "HOROVOD_SIZE": "4"}, L(0, 1, 0, 1, "none")),
    # a malformed variable of a source that lost is never read
    ({**GLOO, "OMPI_COMM_WORLD_RANK": "junk"}, L(1, 2, 1, 2, "horovodrun-gloo")),
    ({**OMPI, "SLURM_STEP_ID": "0", "SLURM_PROCID": "junk"}, L(1, 2, 1, 2, "mpirun")),
    # whitespace in values is tolerated
    ({"OMPI_COMM_WORLD_RANK": " 1 ", "OMPI_COMM_WORLD_SIZE": "2\n"}, L(1, 2, 1, 2, "mpirun")),
], ids=lambda v: None)
def test_detect_layout(env, expected):
    layout = detect_layout(env)
    assert key(layout) == expected
    assert 0 <= layout.rank < layout.size and 0 <= layout.local_rank < layout.local_size <= layout.size


@pytest.mark.parametrize("env,names", [
    ({**OMPI, "OMPI_COMM_WORLD_RANK": "2"}, ["OMPI_COMM_WORLD_RANK=2", "OMPI_COMM_WORLD_SIZE=2"]),
    ({**GLOO, "HOROVOD_RANK": "5"}, ["HOROVOD_RANK=5", "HOROVOD_SIZE=2"]),
    ({**GLOO, "HOROVOD_LOCAL_RANK": "2"}, ["HOROVOD_LOCAL_RANK=2", "HOROVOD_LOCAL_SIZE=2"]),
    ({**GLOO, "HOROVOD_LOCAL_SIZE": "3"}, ["HOROVOD_LOCAL_SIZE=3", "HOROVOD_SIZE=2"]),
    ({**GLOO, "HOROVOD_SIZE": "0"}, ["HOROVOD_SIZE=0"]),
    ({**SRUN, "SLURM_PROCID": "6"}, ["SLURM_PROCID=6", "SLURM_STEP_NUM_TASKS=6"]),
    ({**SRUN, "SLURM_LOCALID": "3"}, ["SLURM_LOCALID=3", "SLURM_STEP_TASKS_PER_NODE=3"]),
    ({**HYDRA, "PMI_RANK": "4"}, ["PMI_RANK=4", "PMI_SIZE=4"]),
    ({**HYDRA, "MPI_LOCALRANKID": "2"}, ["MPI_LOCALRANKID=2", "MPI_LOCALNRANKS=2"]),
])
def test_inconsistent_values_name_the_variables(env, names):
    with pytest.raises(ConfigError) as info:
        detect_layout(env)
    message = str(info.value)
    assert all(n in message for n in names), message
    assert "\n" not in message and "unset" in message


@pytest.mark.parametrize("env,names", [
    ({"OMPI_COMM_WORLD_RANK": "0"}, ["OMPI_COMM_WORLD_SIZE", "mpirun -np"]),
    ({"OMPI_COMM_WORLD_LOCAL_RANK": "0"}, ["OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE are not set"]),
    ({"HOROVOD_GLOO_RENDEZVOUS_ADDR": "10.0.0.1", "HOROVOD_RANK": "0", "HOROVOD_SIZE": "2"},
     ["HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE", "horovodrun --gloo"]),
    ({"PMI_RANK": "0"}, ["PMI_SIZE"]),
    ({"PMIX_RANK": "0"}, ["PMIX_RANK=0", "no job size"]),
    ({"OMPI_COMM_WORLD_RANK": "one", "OMPI_COMM_WORLD_SIZE": "2"}, ["OMPI_COMM_WORLD_RANK='one'", "integer"]),
    ({"OMPI_COMM_WORLD_RANK": "-1", "OMPI_COMM_WORLD_SIZE": "2"}, ["OMPI_COMM_WORLD_RANK='-1'"]),
    ({**SRUN, "SLURM_STEP_TASKS_PER_NODE": "3(x)"}, ["SLURM_STEP_TASKS_PER_NODE='3(x)'", "2(x3),1"]),
])
def test_incomplete_or_malformed_variables(env, names):
    with pytest.raises(ConfigError) as info:
        detect_layout(env)
    assert all(n in str(info.value) for n in names), str(info.value)


@pytest.mark.parametrize("text,counts", [
    ("1", [1]), ("4", [4]), ("2(x3)", [2, 2, 2]), ("2(x3),1", [2, 2, 2, 1]),
    ("1,2(x2),3", [1, 2, 2, 3]), (" 2 (x2) ", [2, 2]),
])
def test_tasks_per_node(text, counts):
    assert tasks_per_node(text) == counts


@pytest.mark.parametrize("text", ["", "x", "2(3)", "2(x3", "-1", "2,,1"])
def test_tasks_per_node_rejects(text):
    with pytest.raises(ConfigError, match="SLURM_TASKS_PER_NODE"):
        tasks_per_node(text)


def test_layout_is_pure_and_describes_itself():
    env = dict(OMPI)
    layout = detect_layout(env)
    assert env == OMPI
    assert "OMPI_COMM_WORLD_LOCAL_RANK" in layout.variables
    assert layout.describe().startswith("mpirun: rank 1/2, local rank 1/2")
    assert detect_layout({}).describe() == "no launcher (one process)"


@pytest.mark.parametrize("local_rank,local_size,gpus,expected", [
    (0, 1, 0, None), (3, 4, 0, None),  # CPU
    (2, 4, 1, 0),                      # the launcher bound one GPU to each rank
    (0, 2, 2, 0), (1, 2, 2, 1), (1, 2, 8, 1), (3, 4, 4, 3),
])
def test_device_index(local_rank, local_size, gpus, expected):
    layout = Layout(local_rank, local_size, local_rank, local_size, "mpirun")
    assert device_index(layout, gpus) == expected


def test_device_index_refuses_shared_gpus_unless_allowed():
    layout = Layout(3, 4, 3, 4, "mpirun")
    with pytest.raises(ConfigError, match="4 ranks run on this host but only 2 GPUs"):
        device_index(layout, 2)
    assert device_index(layout, 2, shared_ok=True) == 1
