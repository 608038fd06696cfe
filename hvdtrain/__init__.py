"""hvdtrain: data-parallel PyTorch training over MPI (Horovod ring-allreduce or mpi4py averaging)."""

__version__ = "0.1.0"
