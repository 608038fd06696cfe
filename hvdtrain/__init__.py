"""hvdtrain: data-parallel PyTorch training over MPI (Horovod ring-allreduce or mpi4py averaging).

    import hvdtrain
    summary = hvdtrain.fit(model, train_dataset, eval_dataset, optimizer=..., epochs=3)
"""

__version__ = "0.2.0"

from hvdtrain.errors import ConfigError  # noqa: E402


def fit(*args, **kwargs):  # noqa: ANN001,ANN201  (thin: keeps `import hvdtrain` free of torch)
    from hvdtrain.api import fit as _fit
    return _fit(*args, **kwargs)


fit.__doc__ = "Train data-parallel; see hvdtrain.api.fit."
__all__ = ["fit", "ConfigError", "__version__"]
