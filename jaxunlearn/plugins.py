"""Plug-ins: strategies, evaluators, models and datasets registered by modules outside the
package, recorded with the run that uses them and imported again wherever it is reopened.

A `Strategy` or `Evaluator` subclass registers itself when its module is imported (a model or a
dataset with `jaxunlearn.models.register_model`, `jaxunlearn.data.register_dataset`). Import
the module before the configuration is read: ``jaxunlearn run --plugin MODULE`` (also on
``fork`` and ``presets``), or ``import MODULE`` before `jaxunlearn.driver.train_and_evaluate`.
A run records the plug-ins its configuration names (`record`: kind, name and module) in its
``config.json`` (and in results.json's ``config``), and every command that reopens it
(``run --resume``, ``fork``, ``forget``, ``audit``, ``report``, and their Python functions)
imports those modules again first (`load`), or stops with a ConfigError naming the missing
module. The package's own plug-ins are never recorded.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json

from jaxunlearn.config import Config, ConfigError

KEY = "plugins"  # config.json's entry: [{"kind", "name", "module"}, ...]
# kind -> (module, attribute): the registry of that kind of plug-in (name -> object).
REGISTRIES = {"strategy": ("jaxunlearn.strategies.base", "REGISTRY"),
              "evaluator": ("jaxunlearn.evaluators.base", "REGISTRY"),
              "model": ("jaxunlearn.models", "MODELS"),
              "dataset": ("jaxunlearn.data", "DATASETS")}


def registry(kind: str) -> dict:
    """The registry of plug-ins of ``kind`` (empty when the package has none of it)."""
    module, attribute = REGISTRIES[kind]
    return getattr(importlib.import_module(module), attribute, {})


def _named(cfg: Config) -> list[tuple[str, str]]:
    """(kind, name) of every plug-in ``cfg`` names, in order."""
    names = [("strategy", cfg.strategy)]
    names += [("evaluator", n.strip()) for n in cfg.evaluators.split(",") if n.strip()]
    names += [("model", m) for m in (cfg.model, cfg.baseline) if m != "none"]
    names += [("dataset", d) for d in dict.fromkeys((cfg.data, cfg.data.split(":")[0]))]
    return names


def _findable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing, say
        return False


def _origin(kind: str, name: str) -> str | None:
    """The module that registered a model or dataset (`register_model`, `register_dataset`
    note it), None for the kinds whose plug-ins are classes."""
    module, _ = REGISTRIES[kind]
    return getattr(importlib.import_module(module), "ORIGINS", {}).get(name)


def _module_of(obj) -> str:
    """The module defining ``obj`` (a class, a function, or a `functools.partial` of one)."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    return getattr(obj, "__module__", None) or type(obj).__module__


def record(cfg: Config) -> list[dict]:
    """``{"kind", "name", "module"}`` of each plug-in ``cfg`` names that a module outside the
    package registered (registered names only: `jaxunlearn.validation` refuses the others).
    One defined in a script or notebook (``__main__``) is recorded too: the process that
    registered it reopens the run as it is, another must register it first (`load` says so)."""
    out = []
    for kind, name in _named(cfg):
        obj = registry(kind).get(name)
        if obj is None:
            continue
        module = _origin(kind, name) or _module_of(obj)
        if module == "jaxunlearn" or module.startswith("jaxunlearn."):
            continue
        entry = {"kind": kind, "name": name, "module": module}
        if entry not in out:
            out.append(entry)
    return out


def describe(cfg: Config) -> dict:
    """What a run stores as its configuration (config.json, results.json's ``config``): every
    setting (`Config.to_dict`) and, when it uses any, its plug-ins (`record`) under
    ``plugins``."""
    used = record(cfg)
    return {**cfg.to_dict(), **({KEY: used} if used else {})}


def config_json(cfg: Config) -> str:
    """`describe` as config.json holds it."""
    return json.dumps(describe(cfg), indent=2, sort_keys=True)


def import_modules(modules, where: str = "--plugin") -> None:
    """Imports each module of ``modules`` (their plug-ins register themselves); ConfigError
    naming the one that cannot be imported."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as e:
            raise ConfigError(f"{where} {module}: the module cannot be imported "
                              f"({type(e).__name__}: {e}); make it importable (install it, or "
                              f"put its folder on PYTHONPATH) and run the command again") from e


def load(entries, where) -> None:
    """Imports the plug-ins a run recorded (``entries``: its ``plugins``, as `record` gives;
    ``where``: the file they come from, for messages) so that their names and settings are
    known; ConfigError naming the module that cannot be imported or no longer registers its
    plug-in."""
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and {"kind", "name", "module"} <= set(e)
            and e["kind"] in REGISTRIES for e in entries):
        raise ConfigError(f"{where}: its {KEY!r} entry is not a list of {{kind, name, module}} "
                          f"with kind one of {', '.join(REGISTRIES)}; put back the run's own file")
    for e in entries:
        kind, name, module = e["kind"], e["name"], e["module"]
        if name in registry(kind):  # registered in this process already (as by its script)
            continue
        if module == "__main__" or not _findable(module):
            raise ConfigError(
                f"{where} uses the {kind} {name!r}, defined in module {module!r}"
                + (" (a script or notebook)" if module == "__main__" else "")
                + f", which this process cannot import; make the module importable (install "
                f"it, or put its folder on PYTHONPATH), or register the {kind} here before "
                f"opening the run")
        try:
            importlib.import_module(module)
        except Exception as error:
            raise ConfigError(
                f"{where} uses the {kind} {name!r} of module {module!r}, which cannot be "
                f"imported here ({type(error).__name__}: {error}); make the module importable "
                f"(install it, or put its folder on PYTHONPATH) and run the command "
                f"again") from error
        if name not in registry(kind):
            raise ConfigError(f"{where} uses the {kind} {name!r} of module {module!r}, which "
                              f"was imported but registers no {kind} {name!r} any more; use a "
                              f"version of the module that does")


def read_config(raw: dict, where) -> dict:
    """The settings of a stored configuration ``raw`` (config.json's, results.json's
    ``config``), its recorded plug-ins imported first (`load`)."""
    settings = dict(raw)
    load(settings.pop(KEY, []), where)
    return settings
