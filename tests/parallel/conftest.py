"""Fixtures for tests that run inside every rank of an mpirun / horovodrun job.

A failing test ends the whole job at once, so the other ranks never wait in a collective
for a rank that has given up.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

UNDER_GLOO = os.environ.get("HOROVOD_CONTROLLER") == "gloo" or "HOROVOD_GLOO_RENDEZVOUS_ADDR" in os.environ
UNDER_MPI = "OMPI_COMM_WORLD_SIZE" in os.environ or "PMIX_RANK" in os.environ


def _abort(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    if UNDER_MPI:
        from mpi4py import MPI
        MPI.COMM_WORLD.Abort(code)
    os._exit(code)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        rank = os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("HOROVOD_RANK", "?"))
        sys.stderr.write(f"\n[rank {rank}] {item.nodeid} failed:\n{report.longreprtext}\n")
        _abort(1)


requires_mpi = pytest.mark.skipif(not UNDER_MPI, reason="needs an MPI world (this file also runs under "
                                                        "horovodrun --gloo, where only Horovod is tested)")


@pytest.fixture(scope="session")
def hvd():
    import horovod.torch as hvd
    hvd.init()
    return hvd


@pytest.fixture(scope="session")
def comm():
    from mpi4py import MPI
    return MPI.COMM_WORLD


@pytest.fixture
def shared_dir(hvd):
    """A temp folder made by rank 0 and the same on every rank (all ranks share this host);
    removed by rank 0 once every rank is done with it."""
    path = tempfile.mkdtemp(prefix="hvdtrain-test-") if hvd.rank() == 0 else None
    path = hvd.broadcast_object(path, root_rank=0, name="shared_dir")
    yield Path(path)
    hvd.allreduce(torch.zeros(1), name="shared_dir.done")
    if hvd.rank() == 0:
        shutil.rmtree(path, ignore_errors=True)


def _rank() -> str:
    for key in ("OMPI_COMM_WORLD_RANK", "HOROVOD_RANK", "PMIX_RANK", "PMI_RANK"):
        if key in os.environ:
            return os.environ[key]
    return "0"


def pytest_sessionfinish(session, exitstatus):
    """Each rank reports its own outcome to the driver (the launcher's output interleaves)."""
    folder = os.environ.get("HVDTRAIN_RESULT_DIR")
    if not folder:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    stats = {k: len(v) for k, v in (reporter.stats if reporter else {}).items() if k in ("passed", "failed",
                                                                                         "skipped", "error")}
    import json
    Path(folder, f"rank-{_rank()}.json").write_text(json.dumps({"exitstatus": int(exitstatus), **stats}))
