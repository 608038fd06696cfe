"""The built-in names of models, losses, optimizers and data sets: the one list that config
validation (`--model`, `--loss`, `--optimizer`, `--data`) and the builders in hvdtrain.registry both read.

A leaf: it imports nothing of hvdtrain and no library, so hvdtrain.config can check a name
without loading torch or the registry. A new built-in is one entry here plus its builder in
hvdtrain/registry.py (a new model: also its class in hvdtrain/models.py).
"""
from __future__ import annotations

#: name -> description (hvdtrain.registry.build_model knows each name)
MODELS: dict[str, str] = {
    "net": "Linear(features, 20) -> ReLU -> Linear(20, outputs); regression",
    "mlp": "fully connected, widths from --hidden; any task",
}
#: name -> description (hvdtrain.registry.build_loss knows each name)
LOSSES: dict[str, str] = {
    "mse": "mean squared error",
    "cross_entropy": "cross-entropy over class logits",
}
#: name -> description (hvdtrain.data.make_dataset writes each; `--data NAME`, inside --out)
DATASETS: dict[str, str] = {
    "regression": "10 features -> 1 target, `--rows` rows generated from the seed",
    "digits": "UCI optical digits (scikit-learn's copy): 1797 8x8 images, 10 classes",
}
#: name -> MODULE:ATTR of the optimizer class, imported when the run starts (sgd also gets --momentum)
OPTIMIZERS: dict[str, str] = {
    "sgd": "torch.optim:SGD",
    "adam": "torch.optim:Adam",
    "adamw": "torch.optim:AdamW",
}
