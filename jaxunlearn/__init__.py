"""jaxunlearn: exact machine unlearning with vectorized ensembles in JAX/Flax.

The public API (documented, with a runnable snippet each, in docs/api.md)::

    import jaxunlearn as ju

    cfg = ju.apply_overrides(ju.PRESETS["smoke"], {"strategy": "rewind"})
    results = ju.train(cfg, "runs/mine")          # train, delete, unlearn, score
    ju.forget("runs/mine", [12, 345])             # a deletion request, applied exactly
    ok, lines, summary = ju.audit("runs/mine")    # no kept state depends on a deleted id
    probs = ju.load("runs/mine").predict(images)  # the trained ensemble, read-only

Names are imported on first use, so ``import jaxunlearn`` stays cheap and the command line
starts fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.3.0"

# name -> (module, attribute): every public name, in the order docs/api.md lists them.
_EXPORTS = {
    # Configuration
    "Config": ("config", "Config"),
    "PRESETS": ("config", "PRESETS"),
    "apply_overrides": ("config", "apply_overrides"),
    "setting": ("config", "setting"),
    # Runs
    "train": ("driver", "train_and_evaluate"),
    "resume": ("driver", "resume"),
    "fork": ("driver", "fork"),
    "forget": ("forgetting", "forget"),
    "audit": ("auditing", "audit"),
    "load": ("trained", "load"),
    "TrainedRun": ("trained", "TrainedRun"),
    "report": ("comparison", "report"),
    # Data
    "Dataset": ("data", "Dataset"),
    "from_arrays": ("data", "from_arrays"),
    "load_dataset": ("data", "load_dataset"),
    "register_dataset": ("data", "register_dataset"),
    # Models
    "register_model": ("models", "register_model"),
    # Unlearning methods and their evaluation
    "Strategy": ("strategies", "Strategy"),
    "Evaluator": ("evaluators", "Evaluator"),
    "StepHook": ("steps", "StepHook"),
    # The device-level pieces: one stacked state, trained and unlearned by pure functions
    "MemberState": ("steps", "MemberState"),
    "init_ensemble": ("ensemble", "init_ensemble"),
    "make_train_step": ("ensemble", "make_train_step"),
    "make_eval_logits": ("ensemble", "make_eval_logits"),
    "make_reinit": ("reinit", "make_reinit"),
    "Lineage": ("lineage", "Lineage"),
    # Errors (each message says what to do)
    "ConfigError": ("config", "ConfigError"),
    "DataError": ("data", "DataError"),
    "RequestError": ("forgetting", "RequestError"),
    "TrainingDiverged": ("trainer", "TrainingDiverged"),
    "CheckpointError": ("checkpoint", "CheckpointError"),
    "RunLocked": ("runlock", "RunLocked"),
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaxunlearn' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(f"{__name__}.{module}"), attribute)
    globals()[name] = value  # once
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
