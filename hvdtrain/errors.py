"""The one user-facing error type (kept here so every module can raise it without import cycles)."""


class ConfigError(ValueError):
    """A user-facing configuration error: one line naming the value and the fix.

    The CLI prints it and exits 2; `hvdtrain.fit` raises it on every rank.
    """
