"""The user cache folder: ``$JAXUNLEARN_CACHE``, else ``$XDG_CACHE_HOME/jaxunlearn``, else
``~/.cache/jaxunlearn``. It holds XLA's compilation cache (``xla/``), so that a second process
(a resumed run, a `forget`) reuses what an earlier one compiled instead of compiling again."""

from __future__ import annotations

import os
import pathlib

ENV_VAR = "JAXUNLEARN_CACHE"


def folder() -> pathlib.Path:
    if os.environ.get(ENV_VAR):
        return pathlib.Path(os.environ[ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "jaxunlearn"


def use_compilation_cache() -> None:
    """Turns on JAX's persistent compilation cache in ``folder()/xla`` (programs that took at
    least half a second to compile), unless ``JAX_COMPILATION_CACHE_DIR`` already names one.
    Call it before anything compiles."""
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str(folder() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
