"""tests/parallel/ holds tests that run inside every rank of a launched job; the plain pytest run
collects only their drivers (test_parallel.py), never the rank-side files themselves."""
import os

import pytest

collect_ignore = [] if os.environ.get("HVDTRAIN_RANK_TESTS") == "1" else ["parallel"]


@pytest.fixture
def jobs():
    """Start jobs a test watches while they run: `proc = jobs.start(cmd, env=...)` is Popen in a
    session of its own; wait with `jobs.finish(proc, timeout)` (kills the whole session on timeout
    and any leftovers). When the test ends, pass or fail, every job it started that is still
    running is killed with its whole session, so a failing assert leaves no rank behind."""
    from support import jobs as helper

    started = []

    class Jobs:
        TIMEOUT_EXIT = helper.TIMEOUT_EXIT
        finish = staticmethod(helper.finish)

        @staticmethod
        def start(cmd, **kwargs):
            proc = helper.start(cmd, **kwargs)
            started.append(proc)
            return proc

    yield Jobs()
    for proc in started:
        if proc.returncode is None:  # not reaped yet: the session id is still this job's
            helper.kill_session(proc.pid)
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture(scope="session")
def shared_cluster(tmp_path_factory):
    """The session's one local cluster (support.cluster.SharedCluster: mpi_jobs/cluster_local.sh,
    3 hosts), brought up by the first test that asks for hosts (`shared_cluster.get(n)`: a view of
    the first n) and taken down at the end of the session, where the teardown checks that no
    namespace, bridge, sshd, state folder or known_hosts entry is left. Needs root."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the local cluster makes network namespaces, a bridge and sshds")
    from support.cluster import SharedCluster

    shared = SharedCluster(tmp_path_factory.mktemp("cluster"))
    yield shared
    shared.down()


@pytest.fixture
def no_cluster(shared_cluster):
    """For a test that needs no local cluster up (it makes its own, or checks that none exists):
    the shared one, if up, is taken down first (and checked); the next test that asks for hosts
    brings it up again."""
    shared_cluster.down()


SINGLETON_VARS = (b"PMIX_RANK", b"PMIX_NAMESPACE", b"PMIX_SERVER_URI3", b"OMPI_MCA_ess_base_jobid")


def _c_getenv(name: bytes) -> bytes | None:
    import ctypes
    libc = ctypes.CDLL(None)
    libc.getenv.restype = ctypes.c_char_p
    return libc.getenv(name)


@pytest.fixture(autouse=True)
def _mpi_never_starts_in_the_test_process():
    """A test that starts MPI in pytest's own process (importing mpi4py.MPI, directly or through a
    module such as strategies.mpi_average) makes Open MPI's singleton set PMIX_* variables in the
    process's C environment (not in os.environ); every later subprocess that inherits it, such as
    `hvdtrain train`, then sees PMIX_RANK=0 and refuses to start. Fail that test by name, and
    unset the variables so the rest of the run is not hit."""
    import ctypes
    before = {n for n in SINGLETON_VARS if _c_getenv(n) is not None}
    yield
    leaked = [n for n in SINGLETON_VARS if n not in before and _c_getenv(n) is not None]
    for n in leaked:
        ctypes.CDLL(None).unsetenv(n)
        os.environ.pop(n.decode(), None)
    if leaked:
        pytest.fail(f"this test started MPI in pytest's process (it left {b', '.join(leaked).decode()} in the "
                    f"environment); start MPI in a subprocess")
