"""What a setting applies to: the `Rule` of each entry of hvdtrain.config.APPLIES (the table sits
next to the settings' definitions) and the check `load_config` runs with it, for the CLI, TOML
files and `fit` alike.

A value other than a setting's default, given where its rule does not hold, is one ConfigError
that names the setting as it was given (flag, `fit` keyword or TOML key), why it does not apply
and what to use instead. A default never is, even when spelled out (`--sync-every 1` with any
backend), so one command line or TOML file can carry the defaults for several backends.

A leaf, like the catalogs: it works on plain data (`Given`, `Run`), so hvdtrain.config can call
it without this module knowing the dataclasses.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple

from hvdtrain.errors import ConfigError

SPEC = "MODULE:ATTR"
"""The kind of a MODULE:ATTR backend, model, optimizer or data source."""
FIT = "fit"
"""The kind of a model or optimizer given to `fit` as an object."""
DATA_KINDS = {SPEC: "--data MODULE:ATTR", "Dataset": "a Dataset given to fit", "folder": "a data folder",
              "arrays": "(X, y) arrays given to fit"}
"""Data kinds besides the built-in sets' names, in words."""


class Rule(NamedTuple):
    """Where a setting takes effect; an empty field puts no limit there."""
    backends: tuple[str, ...] = ()
    """Built-in backends that read it. A MODULE:ATTR backend takes every setting (hvdtrain cannot
    know which ones it reads), unless `plugins` is False."""
    plugins: bool = True
    elastic: bool | None = None
    """True: only under --elastic; False: not under --elastic."""
    models: tuple[str, ...] = ()
    """Built-in model names, SPEC (a MODULE:ATTR model); a model object given to fit is neither."""
    optimizers: tuple[str, ...] = ()
    """Built-in optimizer names, SPEC; an optimizer callable given to fit is neither."""
    data: tuple[str, ...] = ()
    """Built-in data set names, `folder`, SPEC, or what fit was given: `Dataset`, `arrays`."""
    fit_replaces: str = ""
    """The fit() argument whose object takes the setting's place (`optimizer`, `scheduler`, ...)."""
    needs: str = ""
    """A setting that must be off its default for this one to act."""
    not_with: tuple[str, ...] = ()
    """Settings that, off their default, take this one's place."""
    values: tuple[Any, ...] = ()
    """Only these values are limited (`amp`: fp16); empty: every value but the default."""
    one_process: bool = False
    """Only in a job of one process (no launcher, or a launcher that started one)."""
    note: str = ""
    """Said with the fix."""


class Given(NamedTuple):
    """One setting of the run being checked."""
    flag: str        # --sync-every
    key: str         # sync.sync_every (TOML)
    value: Any
    default: Any
    how: str         # how it was given: "flag", "keyword" (fit) or "toml"; a default's origin's


class Run(NamedTuple):
    """What the run is made of, as the rules ask."""
    backend: str
    auto: str                    # why `auto` chose the backend; '' when it was given
    elastic: bool
    model: str                   # built-in name, SPEC or FIT
    model_name: str
    optimizer: str               # built-in name, SPEC or FIT
    optimizer_name: str
    data: str                    # built-in set's name, folder, SPEC, Dataset or arrays
    data_path: str
    supplied: Mapping[str, str]  # fit's objects: argument -> what it is
    builtin_backends: tuple[str, ...]


def is_default(given: Given) -> bool:
    """Equal to the default (an int where a float stands counts: TOML `alpha = 1`)."""
    return bool(given.value == given.default) and isinstance(given.value, bool) == isinstance(given.default, bool)


def _or(items: Any, word: str = "or") -> str:
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {word} {items[-1]}"


def describe(rule: Rule | None, flags: Mapping[str, str], kwarg: str) -> str:
    """Where a setting applies, in words (README, `--help`); '' for a setting of every run.
    `flags` maps every setting's keyword to its flag."""
    if rule is None:
        return ""
    parts = []
    if rule.backends:
        parts.append(f"backend {_or(rule.backends)}" + ("" if rule.plugins else " (not a MODULE:ATTR backend)"))
    if rule.elastic is True:
        parts.append("--elastic runs")
    if rule.elastic is False:
        parts.append("not with --elastic")
    if rule.models:
        parts.append(f"model {_or(rule.models)}")
    if rule.optimizers:
        parts.append(f"optimizer {_or(rule.optimizers)}")
    if rule.data:
        parts.append(_or(DATA_KINDS.get(d, f"--data {d}") for d in rule.data))
    if rule.needs:
        parts.append(f"with {flags[rule.needs]} set")
    if rule.not_with:
        parts.append(f"not with {_or(flags[k] for k in rule.not_with)}")
    if rule.fit_replaces:
        parts.append(f"not with a `fit({rule.fit_replaces}=...)` object")
    if rule.one_process:
        parts.append("one process (no launcher, or -np 1)")
    if rule.note and kwarg == "elastic":
        parts.append(rule.note)
    text = "; ".join(parts)
    return f"{flags[kwarg]} {_or(rule.values)}: {text}" if rule.values else text


class _Names:
    """How a message names a setting: as it was given (flag, fit keyword or TOML key)."""

    def __init__(self, given: Mapping[str, Given], path: str | None) -> None:
        self.given, self.path = given, path

    def name(self, kwarg: str, value: Any, how: str, with_value: bool = True) -> str:
        import json
        g = self.given[kwarg]
        if how == "keyword":
            return f"{kwarg}={value!r}"
        if how == "toml":
            return f"{g.key} = {json.dumps(value)} in {self.path}"
        if isinstance(value, bool) or not with_value:
            return g.flag
        if isinstance(value, dict):
            return f"{g.flag} '{json.dumps(value)}'"
        if isinstance(value, tuple):
            return f"{g.flag} {','.join(str(v) for v in value)}"
        return f"{g.flag} {value}"

    def label(self, kwarg: str, how: str) -> str:
        return {"keyword": kwarg, "toml": self.given[kwarg].key}.get(how, self.given[kwarg].flag)

    def drop(self, kwarg: str, how: str) -> str:
        return {"keyword": f"{kwarg}=", "toml": f"{self.given[kwarg].key} from {self.path}"}.get(
            how, self.given[kwarg].flag)


def _violation(kwarg: str, rule: Rule, run: Run, given: Mapping[str, Given], names: _Names,
               choices: Mapping[str, tuple[Any, ...]]) -> tuple[str, str] | None:
    """(why, what to use instead) when the non-default `kwarg` does not apply to `run`, else None.
    `why` holds {verb} for 'applies' / 'apply'."""
    how = given[kwarg].how

    def use(other: str, value: Any) -> str:
        return "use " + names.name(other, value, how)

    if rule.backends and run.backend not in rule.backends and (run.backend in run.builtin_backends
                                                               or not rule.plugins):
        return (f"{{verb}} to backend {_or(rule.backends)} only, but the backend is {run.backend!r}"
                + (f" ({run.auto})" if run.auto else ""),
                use("backend", rule.backends[0]) + (f" {rule.note}" if rule.note and kwarg == "elastic" else ""))
    if rule.elastic is True and not run.elastic:
        return "{verb} to --elastic runs only, and --elastic is off", use("elastic", True)
    if rule.elastic is False and run.elastic:
        return "elastic", ""  # grouped into one message by check()
    if rule.models and run.model not in rule.models:
        now = "fit() was given a model object" if run.model == FIT else f"the model is {run.model_name!r}"
        fix = "use --model MODULE:ATTR" if rule.models[0] == SPEC else use("model", rule.models[0])
        return (f"{{verb}} to {'MODULE:ATTR models' if rule.models == (SPEC,) else 'model ' + _or(rule.models)} "
                f"only, but {now}", fix + (f" ({rule.note})" if rule.note else ""))
    if rule.optimizers and run.optimizer not in rule.optimizers:
        now = ("fit() was given an optimizer callable" if run.optimizer == FIT
               else f"the optimizer is {run.optimizer_name!r}")
        return (f"{{verb}} to optimizer {_or(rule.optimizers)} only, but {now}",
                use("optimizer", rule.optimizers[0]) + (f" ({rule.note})" if rule.note else ""))
    if rule.data and run.data not in rule.data:
        now = (f"a data folder ({run.data_path!r})" if run.data == "folder"
               else DATA_KINDS.get(run.data, f"the built-in set {run.data!r}"))
        fix = "use --data MODULE:ATTR or a Dataset" if rule.data[0] in DATA_KINDS else use("data", rule.data[0])
        return (f"{{verb}} to {_or(DATA_KINDS.get(d, f'the built-in set {d!r}') for d in rule.data)} only, but the "
                f"data is {now}", fix + (f" ({rule.note})" if rule.note else ""))
    if rule.fit_replaces and rule.fit_replaces in run.supplied:
        return (f"{{verb}} to what hvdtrain builds from settings only, but fit() was given its own "
                f"{rule.fit_replaces} ({run.supplied[rule.fit_replaces]}), which replaces it",
                f"set it in that {rule.fit_replaces}")
    if rule.needs and is_default(given[rule.needs]):
        other = names.label(rule.needs, how)
        wanted = [c for c in choices.get(rule.needs, (True,)) if c != given[rule.needs].default]
        return (f"{{verb}} to runs with {other} {_or(wanted)} only, but {other} is {given[rule.needs].value!r}",
                use(rule.needs, wanted[-1]))
    for other in rule.not_with:
        g = given[other]
        if not is_default(g):
            return (f"{{verb}} to runs without {names.label(other, how)} only, but "
                    f"{names.name(other, g.value, g.how)} is given and takes its place",
                    f"drop {names.drop(other, g.how)}")
    if rule.one_process:
        from hvdtrain.layout import detect_layout
        layout = detect_layout(os.environ)
        if layout.size > 1:
            return (f"{{verb}} to one process only, but {layout.launcher} started {layout.size} processes "
                    f"(each would train alone)", f"use {_or('--backend ' + b for b in ('horovod', 'mpi', 'ddp'))}, "
                                                 f"or start one process")
    return None


def check(rules: Mapping[str, Rule], given: Mapping[str, Given], run: Run, path: str | None,
          choices: Mapping[str, tuple[Any, ...]]) -> None:
    """Every setting off its default against its rule: one ConfigError naming each one that does
    not apply to `run` (grouped by reason), why, and what to use instead. `given` holds every
    setting (in the order of the settings' table), `path` the TOML file, `choices` the values of
    the settings with a fixed set (for the fix of a `needs` rule)."""
    names = _Names(given, path)
    groups: dict[tuple[str, str], list[str]] = {}
    for kwarg, g in given.items():
        rule = rules.get(kwarg)
        if rule is None or is_default(g) or (rule.values and g.value not in rule.values):
            continue
        found = _violation(kwarg, rule, run, given, names, choices)
        if found:
            groups.setdefault(found, []).append(kwarg)
    messages = []
    for (why, fix), kwargs in groups.items():
        if why == "elastic":  # Horovod's elastic state lives in the workers' memory (strategies/elastic.py)
            elastic = names.name("elastic", True, given["elastic"].how, with_value=False)
            listed = [names.name(k, given[k].value, given[k].how, with_value=bool(rules[k].values)) +
                      (f" ({rules[k].note})" if rules[k].note else "") for k in kwargs]
            messages.append(f"{elastic} does not support {', '.join(listed)}: Horovod's elastic state is held in "
                            f"memory and holds no checkpoint file, grad scaler or lr scheduler; drop "
                            f"{'it' if len(listed) == 1 else 'them'} or {elastic}")
            continue
        listed = [names.name(k, given[k].value, given[k].how) for k in kwargs]
        drop = names.drop(kwargs[0], given[kwargs[0]].how) if len(kwargs) == 1 else "them"
        verb = "applies" if len(kwargs) == 1 else "apply"
        messages.append(f"{_or(listed, 'and')} {why.format(verb=verb)}; {fix}, or drop {drop}")
    if messages:
        raise ConfigError("; also ".join(messages))
