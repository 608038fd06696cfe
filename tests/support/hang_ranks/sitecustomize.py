"""Test hook of tests/test_teardown.py, imported by every Python process that has this folder on
PYTHONPATH (only the jobs that test starts): a rank of a job (a process mpirun or Horovod's
launcher started: OMPI_COMM_WORLD_RANK or HOROVOD_RANK is set) sleeps here instead of running, so
the test can signal a launcher-side command while its ranks exist without spending the shared
cores on them. The command itself (no rank variables) runs normally."""
import os
import time

if "OMPI_COMM_WORLD_RANK" in os.environ or "HOROVOD_RANK" in os.environ:
    time.sleep(3600)
