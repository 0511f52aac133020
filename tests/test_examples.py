"""The examples run as a user runs them (each its own process, in a fresh folder) and say what
they should."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, cwd: pathlib.Path) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd,
                          capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_bring_your_own_data_model_and_strategy(tmp_path):
    out = run_example("bring_your_own.py", "--out", "run", cwd=tmp_path)
    assert "request 1 applied: 3 id(s) deleted" in out  # forgotten from a new process
    assert "0 violation(s)" in out  # audited from a new process
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    modules = {(p["kind"], p["name"]): p["module"] for p in config["plugins"]}
    assert modules == {("strategy", "gradascent"): "my_plugins", ("model", "mlp"): "my_plugins",
                       ("dataset", "blobs"): "my_plugins"}
    assert config["ascent_weight"] == 0.5
    accuracy = float(out.rsplit("test accuracy after forgetting ", 1)[1].split("%")[0])
    assert accuracy > 80  # three well-separated blobs


def test_a_learning_rate_sweep_as_one_stacked_run(tmp_path):
    out = run_example("lr_sweep.py", "--lrs", "0.3,0.01", "--epochs", "2", "--out", "run",
                      cwd=tmp_path)
    members = json.loads((tmp_path / "run" / "results.json").read_text())["final"]["members"]
    assert [m["settings"] for m in members] == [{"learning_rate": 0.3},
                                                {"learning_rate": 0.01}]
    for m in members:  # the printed table is results.json's
        assert f"{m['settings']['learning_rate']:>14g}  {m['test_accuracy']:.1%}" in out
    assert "one stacked run of 2 members" in out


def test_load_and_predict(tmp_path):
    out = run_example("load_and_predict.py", "--out", "run", cwd=tmp_path)
    assert "ensemble accuracy" in out and "largest difference from predict" in out


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_every_example_has_a_docstring_saying_how_to_run_it(name):
    text = (EXAMPLES / name).read_text()
    assert text.startswith('"""')
    if name != "my_plugins.py":
        assert f"python examples/{name}" in text
