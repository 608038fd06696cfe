"""Read MPI control variables back through the MPI tool interface (MPI_T), with ctypes on the MPI
library this process already loaded (mpi4py's or Horovod's): what Open MPI actually holds,
whatever set it (the environment, mpirun --mca, a file), not what we hoped to set.

Nothing here loads an MPI library: no MPI in the process means None. MPI_T is initialised once
per process and never finalised: in Open MPI 4.1 the MPI_T_finalize that drops its count to zero
closes the components MPI_T opened and tears down Open MPI's utility layer, under a running MPI
(measured: rank 0 of a Horovod job segfaulted right after it; MPI_Finalize does not need it).
"""
from __future__ import annotations

import ctypes
import re
import struct
from pathlib import Path

MPI_SUCCESS = 0
MPI_THREAD_SINGLE = 0
_mpit_started: str | None = None  # the libmpi whose MPI_T this process initialised
_LIBMPI = re.compile(r"/libmpi\.so(\.\d+)*$")
# Open MPI's predefined datatypes are exported objects; MPI_INT is &ompi_mpi_int. Sizes in bytes.
_OMPI_TYPES = {"ompi_mpi_int": ("i", 4), "ompi_mpi_unsigned": ("I", 4), "ompi_mpi_long": ("q", 8),
               "ompi_mpi_unsigned_long": ("Q", 8), "ompi_mpi_long_long_int": ("q", 8),
               "ompi_mpi_unsigned_long_long": ("Q", 8), "ompi_mpi_double": ("d", 8)}


def loaded_libmpi() -> str | None:
    """Path of the libmpi shared object mapped into this process, or None."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        if _LIBMPI.search(path):
            return path
    return None


def _datatypes(lib: ctypes.CDLL) -> dict[int, tuple[str, int]]:
    out = {}
    for symbol, kind in _OMPI_TYPES.items():
        try:
            out[ctypes.addressof(ctypes.c_char.in_dll(lib, symbol))] = kind
        except ValueError:  # not Open MPI: every value is read as an int
            pass
    return out


def read_cvars(names: list[str]) -> dict[str, int | float] | None:
    """{name: value} of the MPI_T control variables `names` (full names, e.g.
    "coll_tuned_allreduce_algorithm"), read in this process; names MPI does not know are left
    out. None unless a loaded libmpi with MPI_T is running MPI (initialised, not finalised): a
    library that is only loaded (Horovod over Gloo) would report the environment, not a job."""
    path = loaded_libmpi()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)  # the copy already loaded: same handle
        init, get_index = lib.MPI_T_init_thread, lib.MPI_T_cvar_get_index
        alloc, read, free = lib.MPI_T_cvar_handle_alloc, lib.MPI_T_cvar_read, lib.MPI_T_cvar_handle_free
        info = lib.MPI_T_cvar_get_info
        initialized, finalized = ctypes.c_int(), ctypes.c_int()
        lib.MPI_Initialized(ctypes.byref(initialized))
        lib.MPI_Finalized(ctypes.byref(finalized))
    except (OSError, AttributeError):
        return None
    if not initialized.value or finalized.value:
        return None
    get_index.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)]
    alloc.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int)]
    read.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    free.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
    info.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int),
                     ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p,
                     ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]
    global _mpit_started
    if _mpit_started != path:
        provided = ctypes.c_int()
        if init(MPI_THREAD_SINGLE, ctypes.byref(provided)) != MPI_SUCCESS:
            return None
        _mpit_started = path
    types = _datatypes(lib)
    values: dict[str, int | float] = {}
    for name in names:
        index, count, handle = ctypes.c_int(), ctypes.c_int(), ctypes.c_void_p()
        if get_index(name.encode(), ctypes.byref(index)) != MPI_SUCCESS:
            continue  # not a parameter of this MPI (or its component is not built)
        datatype, enum = ctypes.c_void_p(), ctypes.c_void_p()
        name_len, verbosity, desc_len, bind, scope = (ctypes.c_int(0) for _ in range(5))  # 0: no strings
        if info(index.value, None, ctypes.byref(name_len), ctypes.byref(verbosity), ctypes.byref(datatype),
                ctypes.byref(enum), None, ctypes.byref(desc_len), ctypes.byref(bind),
                ctypes.byref(scope)) != MPI_SUCCESS:
            continue
        if alloc(index.value, None, ctypes.byref(handle), ctypes.byref(count)) != MPI_SUCCESS:
            continue
        buf = ctypes.create_string_buffer(max(64, 8 * count.value))
        ok = read(handle, buf) == MPI_SUCCESS
        free(ctypes.byref(handle))
        if ok:
            fmt, size = types.get(datatype.value or 0, ("i", 4))
            values[name] = struct.unpack_from(fmt, buf.raw[:size])[0]
    return values
