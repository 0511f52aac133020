"""The public surface: `jaxunlearn.__all__` is exactly what docs/api.md documents, every
snippet there runs, and a trained run loads read-only and predicts what its results say."""

import dataclasses
import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import jaxunlearn
from jaxunlearn import config as config_lib, driver, runlock

ROOT = pathlib.Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api.md"


def _sections() -> dict[str, str]:
    """Each documented name -> the text of its section."""
    parts = re.split(r"^### `([^`]+)`\n", API.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_the_docs_list_exactly_the_exported_names():
    documented = list(_sections())
    assert len(documented) == len(set(documented))
    assert sorted(documented) == sorted(jaxunlearn.__all__)
    for name in jaxunlearn.__all__:
        assert getattr(jaxunlearn, name) is not None
    with pytest.raises(AttributeError):
        jaxunlearn.not_a_name


def test_every_documented_name_has_a_snippet():
    bare = [name for name, text in _sections().items() if "```python" not in text]
    assert bare == []


def test_import_stays_cheap():
    code = "import sys, jaxunlearn; print('jax' in sys.modules, jaxunlearn.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == "False" and out[1] == jaxunlearn.__version__


def test_the_snippets_run_in_order(tmp_path, monkeypatch):
    code = "\n".join(re.findall(r"```python\n(.*?)```", API.read_text(), flags=re.S))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "empty-folder-with-a-config").mkdir(parents=True)
    (tmp_path / "runs" / "empty-folder-with-a-config" / "config.json").write_text(
        config_lib.PRESETS["smoke"].to_json())
    namespace = {"__name__": "api_snippets"}
    exec(compile(code, str(API), "exec"), namespace)
    assert (tmp_path / "report" / "table.md").is_file()
    assert namespace["ok"] is True


@pytest.fixture(scope="module")
def finished(tmp_path_factory, sample):
    out = tmp_path_factory.mktemp("trained") / "run"
    cfg = config_lib.apply_overrides(config_lib.PRESETS["smoke"], {"aggregation": "mean_probs"})
    driver.train_and_evaluate(cfg, out, dataset=sample, log=lambda s: None)
    return out


def test_a_loaded_run_predicts_what_its_results_recorded(finished, sample, capsys):
    run = jaxunlearn.load(finished)
    assert capsys.readouterr().out == ""  # nothing printed
    results = json.loads((finished / "results.json").read_text())
    x, y = sample.test_images[:100], sample.test_labels[:100]
    probs = run.predict(x)
    assert probs.shape == (100, 10) and probs.dtype == np.float32
    final = results["final"]["ensemble"]
    assert np.mean(probs.argmax(1) == y) == pytest.approx(final["test_accuracy"])
    loss = -np.mean(np.log(probs[np.arange(100), y].astype(np.float64)))
    assert loss == pytest.approx(final["test_loss"], rel=1e-5)  # mean_probs, as configured
    each = run.predict(x, per_member=True)
    assert each.shape == (3, 100, 10)
    for member, record in zip(each, results["final"]["members"]):
        assert np.mean(member.argmax(1) == y) == pytest.approx(record["test_accuracy"])
    base = run.predict(x, group="baseline")
    assert np.mean(base.argmax(1) == y) == pytest.approx(
        results["final"]["baseline"]["test_accuracy"])
    # A vote, as the run's scores count it (`metrics.aggregate`): its argmax is the majority.
    from jaxunlearn import metrics

    run.config = dataclasses.replace(run.config, aggregation="vote")
    votes = run.predict(x)
    assert votes.shape == (100, 10) and np.allclose(votes.sum(axis=1), 1, atol=1e-5)
    scored = metrics.aggregate(np.log(each), y, None, "vote")["test_accuracy"]
    assert np.mean(votes.argmax(1) == y) == pytest.approx(scored)
    majority = np.eye(10)[each.argmax(-1)].sum(0)
    assert (majority[np.arange(100), votes.argmax(1)] == majority.max(1)).all()
    stacked = run.variables()
    assert jax_leaves_first_axis(stacked) == {3}
    with pytest.raises(IndexError, match="members 0..2"):
        run.variables(member=3)
    with pytest.raises(ValueError, match="has no group 'oracle'"):
        run.predict(x, group="oracle")


def jax_leaves_first_axis(tree) -> set[int]:
    import jax

    return {leaf.shape[0] for leaf in jax.tree.leaves(tree)}


def test_loading_takes_no_lock(finished, sample):
    with runlock.run_lock(finished, purpose="test"):  # another process would hold it so
        probs = jaxunlearn.load(finished).predict(sample.test_images[:4])
    assert probs.shape == (4, 10)


def test_predict_refuses_inputs_unlike_the_training_data(finished):
    run = jaxunlearn.load(finished)
    with pytest.raises(jaxunlearn.trained.PredictError, match=r"\[n, 32, 32, 3\]"):
        run.predict(np.zeros((2, 28, 28, 1), np.uint8))
    with pytest.raises(jaxunlearn.trained.PredictError, match="uint8"):
        run.predict(np.zeros((2, 32, 32, 3), np.float64))


def test_the_predict_command_writes_probabilities(finished, sample, tmp_path):
    from jaxunlearn import cli

    np.save(tmp_path / "x.npy", sample.test_images[:5])
    code = cli.main(["predict", str(finished), "--inputs", str(tmp_path / "x.npy"),
                     "--out", str(tmp_path / "p.npy")])
    assert code == 0
    probs = np.load(tmp_path / "p.npy")
    assert probs.shape == (5, 10)
    np.testing.assert_allclose(probs, jaxunlearn.load(finished).predict(sample.test_images[:5]),
                               rtol=1e-6)
    np.save(tmp_path / "bad.npy", np.zeros((5, 8), np.uint8))
    assert cli.main(["predict", str(finished), "--inputs", str(tmp_path / "bad.npy"),
                     "--out", str(tmp_path / "q.npy")]) == cli.BAD_INPUT
    assert not (tmp_path / "q.npy").exists()
