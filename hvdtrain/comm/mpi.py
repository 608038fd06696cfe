"""Collectives over mpi4py's COMM_WORLD (`.mpi` is the raw communicator for strategies), and
`SharedRows`: the weighted sum of one flat buffer per rank when every rank shares one host."""
from __future__ import annotations

import errno
import mmap
import os
import secrets
from typing import Any

import numpy as np
from mpi4py import MPI

from hvdtrain.comm.base import Comm
from hvdtrain.comm.ring import segment_bounds

SHARED_DIR = "/dev/shm"
"""Where `SharedRows` maps its file (tmpfs: memory, never disk); unlinked once every rank has it."""
SHARED_CHUNK_BYTES = 256 << 10
"""Elements reduced per step of `SharedRows.weighted_sum_`: every rank's chunk, the two scratch
chunks and the result stay in a core's L2 cache (2 MiB here) while they are combined."""
PAGE = 4096


class MPIComm(Comm):
    kind = "mpi"

    def __init__(self) -> None:
        self.mpi = MPI.COMM_WORLD
        local = self.mpi.Split_type(MPI.COMM_TYPE_SHARED, key=self.mpi.rank)
        super().__init__(self.mpi.rank, self.mpi.size, local.rank, local.size)
        local.Free()

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        buf = np.array(values, dtype=np.float64)
        self.mpi.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        return buf

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        return self.mpi.bcast(obj, root=root)

    def allgather_object(self, obj: Any) -> list[Any]:
        return self.mpi.allgather(obj)

    def gather_object(self, obj: Any, root: int = 0) -> list[Any] | None:
        return self.mpi.gather(obj, root=root)

    def barrier(self) -> None:
        self.mpi.Barrier()

    def abort(self, code: int) -> None:
        self.mpi.Abort(code)


def on_one_host(comm: Any) -> bool:
    """True on every rank when all ranks of `comm` share one node's memory (collective)."""
    shared = comm.Split_type(MPI.COMM_TYPE_SHARED)
    mine = int(shared.Get_size() == comm.Get_size())
    shared.Free()
    return comm.allreduce(mine, op=MPI.MIN) == 1


def _reserve(fd: int, nbytes: int) -> None:
    """Give the file its pages now: ENOSPC here (a full /dev/shm) instead of SIGBUS at first touch."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, nbytes)  # no fallocate on this file system: check the room instead
        st = os.fstatvfs(fd)
        if st.f_bavail * st.f_frsize < nbytes:
            raise OSError(errno.ENOSPC, f"{nbytes} bytes do not fit in {SHARED_DIR}") from None


class SharedRows:
    """One row of `n` elements per rank of `comm` in one mapping of shared memory, which every
    rank sees whole: `mine` is this rank's row (use it as the rank's flat buffer), `rows` all of
    them. `weighted_sum_(w)` leaves sum_j w_j row_j in every row, w_j being each rank's own `w`:
    the MPI fallback's weighted average as one pass over memory, with no message and no separate
    weighting pass. Rank r reduces segment r (segment_bounds) of every row, chunk by chunk in
    cache, in rank order (fl(fl(w_0 x_0) + fl(w_1 x_1)) + ...: with 2 ranks the same bits as
    scaling and MPI_Allreduce), and writes the result into that segment of every row; two
    barriers order it (all rows final before anyone reads; all written before anyone goes on).
    Memory moved per rank: read the buffer once, write it once; a tuned MPI_Allreduce moves
    about 2.5 buffers (copy in, reduce, copy back) and the weighting pass 2 more.

    Build it with `create` (collective), which returns None, on every rank, when the rows
    cannot be had (no /dev/shm, or too little room in it): use MPI then.
    """

    def __init__(self, comm: Any, buf: mmap.mmap, n: int, dtype: np.dtype) -> None:
        self.comm, self.rank, self.size = comm, comm.Get_rank(), comm.Get_size()
        self._map = buf  # the arrays below export its buffer: it lives as long as they do
        header, stride = self.layout(n, dtype, self.size)
        self.weights = np.frombuffer(buf, dtype=np.float64, count=self.size)
        self.rows = [np.frombuffer(buf, dtype=dtype, count=n, offset=header + j * stride)
                     for j in range(self.size)]
        self.mine = self.rows[self.rank]
        start, stop = segment_bounds(n, self.size)[self.rank]
        step = max(1, SHARED_CHUNK_BYTES // dtype.itemsize)
        # Views made once: a sync then costs a few numpy calls per chunk, no slicing.
        self._chunks = [[row[a:min(a + step, stop)] for row in self.rows] for a in range(start, stop, step)]
        self._acc = np.empty(min(step, max(stop - start, 1)), dtype=dtype)
        self._tmp = np.empty_like(self._acc)

    @staticmethod
    def layout(n: int, dtype: np.dtype, size: int) -> tuple[int, int]:
        """(header, row stride) in bytes, whole pages: the weights (float64 per rank), then the rows."""
        pages = lambda nbytes: -(-max(nbytes, 1) // PAGE) * PAGE  # noqa: E731
        return pages(8 * size), pages(n * dtype.itemsize)

    @classmethod
    def create(cls, comm: Any, n: int, dtype: Any) -> "SharedRows | None":
        """Map the rows on every rank of `comm` (which must share one host: `on_one_host`);
        None on every rank if any rank could not. Rank 0 creates and reserves the file, the
        others open it, then it is unlinked: nothing is left in /dev/shm, whatever happens next."""
        dtype = np.dtype(dtype)
        rank, size = comm.Get_rank(), comm.Get_size()
        header, stride = cls.layout(n, dtype, size)
        nbytes = header + size * stride
        path, fd = None, -1
        if rank == 0:
            path = os.path.join(SHARED_DIR, f"hvdtrain-{os.getpid()}-{secrets.token_hex(8)}")
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                _reserve(fd, nbytes)
            except OSError:
                if fd >= 0:
                    os.close(fd)
                    os.unlink(path)
                path, fd = None, -1
        path = comm.bcast(path, root=0)
        buf = None
        if path is not None:
            try:
                if fd < 0:
                    fd = os.open(path, os.O_RDWR)
                buf = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError:
                buf = None
            finally:
                if fd >= 0:
                    os.close(fd)
        ok = comm.allreduce(int(buf is not None), op=MPI.MIN) == 1  # every rank has opened (or failed)
        if rank == 0 and path is not None:
            os.unlink(path)
        return cls(comm, buf, n, dtype) if ok else None

    def weighted_sum_(self, weight: float) -> None:
        """Every row <- sum_j w_j row_j, where rank j called this with w_j (collective)."""
        self.weights[self.rank] = weight
        self.comm.Barrier()  # every rank's row and weight are final
        w = [float(x) for x in self.weights]  # Python floats: float32 rows scale in float32, as native does
        acc_all, tmp_all = self._acc, self._tmp
        last = self.size - 1
        for views in self._chunks:
            m = views[0].size
            acc, tmp = acc_all[:m], tmp_all[:m]
            np.multiply(views[0], w[0], out=acc)
            for j in range(1, self.size):
                np.multiply(views[j], w[j], out=tmp)
                np.add(acc, tmp, out=views[0] if j == last else acc)  # the sum lands in row 0 ...
            if last == 0:
                np.copyto(views[0], acc)
            for j in range(1, self.size):
                np.copyto(views[j], views[0])  # ... and is copied from there, still in cache
        self.comm.Barrier()  # every segment written into every row
