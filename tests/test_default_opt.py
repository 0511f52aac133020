"""The bit-for-bit claims (rewind equals the oracle, members no deletion touched stay as they
were, a resumed run equals an uninterrupted one) at XLA's default optimisation level and with
the fast recipe, in a subprocess: the rest of the suite compiles with the backend's
optimisation off (conftest), which is not what users run."""

import os
import pathlib
import subprocess
import sys


def test_bit_for_bit_claims_hold_at_the_default_optimisation_level(tmp_path):
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").replace("--xla_backend_optimization_level=0", "").strip()
    env["XLA_FLAGS"] = flags
    worker = pathlib.Path(__file__).with_name("default_opt_worker.py")
    done = subprocess.run([sys.executable, str(worker), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "default-opt ok" in done.stdout
