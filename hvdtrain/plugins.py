"""`MODULE:ATTR` plug-ins and the registries of built-in names (models, losses, optimizers).

A plug-in is found the way gunicorn and LightningCLI find an app: MODULE is imported from
`sys.path` plus the current folder, then ATTR (dots allowed) is read from it. Every failure is
a ConfigError naming MODULE:ATTR and what was found, never a traceback.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable

from hvdtrain.errors import ConfigError


def is_spec(text: Any) -> bool:
    """True for 'MODULE:ATTR' (a folder path such as C:\\data or ./x:y that exists is not one)."""
    return isinstance(text, str) and ":" in text and not os.path.exists(text)


def load_attr(spec: str, flag: str) -> Any:
    """Import MODULE and return ATTR for `spec` = 'MODULE:ATTR'; `flag` names the setting."""
    module, _, attr = spec.partition(":")
    if not module or not attr or ":" in attr:
        raise ConfigError(f"{flag} {spec!r} is not MODULE:ATTR; write e.g. mypkg.models:Net")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        obj: Any = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            raise ConfigError(f"{flag} {spec!r}: module {module!r} was not found on sys.path or in "
                              f"{os.getcwd()}; check the name or add its folder to PYTHONPATH") from None
        raise ConfigError(f"{flag} {spec!r}: importing {module!r} failed (ModuleNotFoundError: {exc}); "
                          f"install what it needs") from None
    except Exception as exc:  # the user's module raised while importing
        raise ConfigError(f"{flag} {spec!r}: importing {module!r} raised {_describe(exc)}; fix the "
                          f"module") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{flag} {spec!r}: module {module!r} has no attribute {attr!r}; check "
                              f"the name after ':'")
        obj = getattr(obj, part)
    return obj


def call_plugin(spec: str, flag: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a user factory; an exception it raises becomes one line naming `spec`."""
    if not callable(fn):
        raise ConfigError(f"{flag} {spec}: found {type(fn).__name__} {fn!r:.60}, which is not callable; "
                          f"point it at a class or a function")
    try:
        return fn(*args, **kwargs)
    except ConfigError:
        raise
    except Exception as exc:  # hvdtrain's own call of the user's factory: one line, never a traceback
        how = f" as {_call_text(fn, args, kwargs)}" if isinstance(exc, TypeError) else ""
        raise ConfigError(f"{flag} {spec}: calling it{how} raised {_describe(exc)}; fix the factory or its "
                          f"arguments") from None


def _call_text(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """How hvdtrain called `fn` (a TypeError is usually a signature that does not match this)."""
    def show(value: Any) -> str:
        if isinstance(value, list) and value and all(type(v).__name__ == "Parameter" for v in value):
            return "params"
        text = repr(value) if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__
        return text if len(text) <= 30 else text[:27] + "..."
    name = getattr(fn, "__name__", type(fn).__name__)
    return f"{name}({', '.join([show(a) for a in args] + [f'{k}={show(v)}' for k, v in kwargs.items()])})"


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def describe_error(exc: BaseException) -> str:
    """'Type: first line of the message' for an exception raised by user code."""
    return _describe(exc)


def nearest(name: str, choices: Any) -> str:
    """' (did you mean X?)' when a close match exists, else ''."""
    import difflib
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""
