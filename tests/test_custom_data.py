"""Data and models of your own: `data.from_arrays`, `.npz` files and named datasets, their
checks; `models.register_model` and its contract (no BatchNorm statistics, no ``weight``); runs
on them end to end (train, forget, audit, the command line); a forget that cannot have the
run's data records nothing."""

import json
import pathlib
import shutil

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import group_state, results_of
from jaxunlearn import cli, config, data, driver, forgetting, models, runlock, steps, validation
from jaxunlearn.auditing import audit
from jaxunlearn.config import ConfigError


class MLP(nn.Module):
    """Feature vectors -> logits; no BatchNorm, no ``weight`` argument."""

    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        hidden = nn.relu(nn.Dense(8)(x))
        return nn.Dense(self.num_classes)(hidden)


class CNN(nn.Module):
    """Images -> logits with Flax's own BatchNorm (padding counts in its statistics)."""

    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), strides=2)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


class Counting(nn.Module):
    """Holds a collection the contract does not allow."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        self.variable("counters", "calls", lambda: jnp.zeros((), jnp.int32))
        return nn.Dense(3)(x)


def mlp(num_classes, **_):
    return MLP(num_classes)


def cnn(num_classes, **_):
    return CNN(num_classes)


@pytest.fixture(autouse=True, scope="module")
def registered():
    for name, factory in (("test-mlp", mlp), ("test-cnn", cnn)):
        models.register_model(name, factory)
    yield
    for name in ("test-mlp", "test-cnn"):
        models.MODELS.pop(name)


def features(seed=0, n=80, n_test=20, d=5, classes=3, **declared) -> data.Dataset:
    rng = np.random.default_rng(seed)
    return data.from_arrays(rng.normal(size=(n, d)), rng.integers(0, classes, n),
                            rng.normal(size=(n_test, d)), rng.integers(0, classes, n_test),
                            **declared)


def images(seed=0, n=60, n_test=20, classes=12) -> tuple:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, classes, n),
            rng.integers(0, 256, (n_test, 28, 28, 1), dtype=np.uint8),
            rng.integers(0, classes - 1, n_test))  # the test split lacks the last class


def tiny(**changes) -> config.Config:
    return config.apply_overrides(config.PRESETS["smoke"], dict(
        dict(members=2, phases=2, epochs=1, batch_size=16, eval_batch_size=32, train_limit=0,
             test_limit=0, deletion_rate=0.0, baseline="none"), **changes))


# ------------------------------------------------------------------------- datasets and checks

def test_classes_and_normalisation_come_from_the_data():
    train, ytrain, test, ytest = images(classes=12)
    ds = data.from_arrays(train, ytrain, test, ytest)
    assert ds.classes == int(max(ytrain.max(), ytest.max())) + 1 == 12
    assert ds.input_shape == (28, 28, 1) and ds.train_images.dtype == np.uint8
    # The test split's statistics: no deletion touches them (the training split's would keep a
    # trace of every deleted example in every member).
    pixels = test.reshape(-1, 1) / 255.0
    np.testing.assert_allclose(ds.mean, pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(ds.std, pixels.std(axis=0), rtol=1e-9)
    other = data.from_arrays(train // 2, ytrain, test, ytest)  # other training pixels
    assert (other.mean, other.std) == (ds.mean, ds.std)
    assert data.from_arrays(train, ytrain, test, ytest, classes=20).classes == 20
    feats = features()
    x = feats.test_images.astype(np.float64)
    np.testing.assert_allclose(feats.mean, x.mean(axis=0), rtol=1e-6)  # per feature, no /255
    np.testing.assert_allclose(feats.std, x.std(axis=0), rtol=1e-5)
    with pytest.raises(ValueError, match="no test examples.*declare mean and std"):
        data.from_arrays(x[:4], [0, 1, 0, 1], x[:0], np.zeros(0, int))
    constant = data.from_arrays(np.ones((4, 2)), [0, 1, 0, 1], np.ones((2, 2)), [0, 1])
    assert constant.std == (1.0, 1.0)  # a feature that never varies is left unscaled
    declared = features(mean=0.5, std=[1, 2, 3, 4, 5])
    assert declared.mean == (0.5,) * 5 and declared.std == (1.0, 2.0, 3.0, 4.0, 5.0)
    assert declared.limit(10, 5).stats == declared.stats and declared.limit(10, 5).classes == 3


@pytest.mark.parametrize("arrays, declared, message", [
    ((np.zeros((4, 28, 28)), [0, 1, 0, 1]), {}, r"add a channel axis"),
    ((np.zeros((4, 3), np.int64), [0, 1, 0, 1]), {}, r"uint8 \(pixels 0..255\) or floating"),
    ((np.zeros((4, 3)), [0.0, 1.0, 0.0, 1.0]), {}, r"integer class numbers.*astype"),
    ((np.zeros((4, 3)), [0, 1, -1, 1]), {}, r"map the classes to 0..classes-1"),
    ((np.zeros((4, 3)), [0, 1, 19, 1]), {"classes": 10}, r"declare classes=20"),
    ((np.zeros((4, 3)), [0, 0, 0, 0]), {"classes": 1}, r"an integer >= 2"),
    ((np.full((4, 3), np.nan), [0, 1, 0, 1]), {}, r"NaN.*clean or drop"),
    ((np.zeros((4, 3)), [0, 1, 0, 1]), {"std": [1, 0, 1]}, r"std must be finite and positive"),
    ((np.zeros((4, 3)), [0, 1, 0, 1]), {"mean": [1, 2]}, r"one number per channel"),
])
def test_bad_arrays_are_refused_saying_what_to_do(arrays, declared, message):
    x, y = arrays
    with pytest.raises(ValueError, match=message):
        data.from_arrays(x, y, np.zeros((2,) + np.shape(x)[1:], np.asarray(x).dtype), [0, 1],
                         **declared)


def test_splits_must_agree():
    with pytest.raises(ValueError, match="same shape after the first axis"):
        data.from_arrays(np.zeros((4, 3)), [0, 1, 0, 1], np.zeros((2, 4)), [0, 1])


def test_cifar10_sources_keep_cifar10_constants_and_arithmetic(sample):
    assert (sample.mean, sample.std, sample.classes) == (data.CIFAR10_MEAN, data.CIFAR10_STD, 10)
    assert sample.spec == data.CIFAR10_SPEC and sample.limit(7, 3).spec == data.CIFAR10_SPEC
    x = jnp.asarray(sample.train_images[:4])
    before = (x.astype(jnp.float32) / 255.0 - jnp.asarray(data.CIFAR10_MEAN)) / jnp.asarray(
        data.CIFAR10_STD)  # the arithmetic every CIFAR-10 run was trained with
    assert np.array_equal(steps.normalize(x), before)
    assert np.array_equal(steps.normalize(x, sample.stats), before)


def test_normalize_uses_the_datasets_statistics():
    ds = features()
    x = jnp.asarray(ds.train_images[:3])
    expected = (ds.train_images[:3] - np.asarray(ds.mean)) / np.asarray(ds.std)
    np.testing.assert_allclose(steps.normalize(x, ds.stats), expected, rtol=1e-5, atol=1e-6)
    u8 = jnp.asarray(np.full((1, 2, 2, 1), 51, np.uint8))
    np.testing.assert_allclose(steps.normalize(u8, ((0.1,), (0.5,))), 0.2, rtol=1e-6)


def test_npz_files_and_registered_names(tmp_path, monkeypatch):
    arrays = dict(zip(data.NPZ_ARRAYS, images()))
    path = tmp_path / "mine.npz"
    np.savez(path, **arrays, classes=15)
    loaded = data.load_dataset(str(path))
    assert loaded.kind == "npz" and loaded.classes == 15 and str(path) in loaded.source
    assert np.array_equal(loaded.train_images, arrays["train_images"])
    assert data.load_npz(path, classes=13).classes == 13  # an argument overrides the file
    np.savez(tmp_path / "half.npz", train_images=arrays["train_images"])
    with pytest.raises(data.DataError, match="lacks train_labels, test_images, test_labels"):
        data.load_dataset(str(tmp_path / "half.npz"))
    with pytest.raises(data.DataError, match="no such file"):
        data.load_dataset(str(tmp_path / "absent.npz"))
    np.savez(tmp_path / "wide.npz", **{**arrays, "classes": 3})
    with pytest.raises(data.DataError, match="wide.npz: the labels go up to"):
        data.load_dataset(str(tmp_path / "wide.npz"))

    monkeypatch.setattr(data, "DATASETS", dict(data.DATASETS))
    loader = data.register_dataset("mine", lambda: data.load_npz(path))
    assert data.DATASETS["mine"] is loader and data.load_dataset("mine").classes == 15
    data.register_dataset("mine", loader)  # the same loader again: nothing changes
    with pytest.raises(ValueError, match="taken"):
        data.register_dataset("mine", lambda: None)
    for bad in ("a/b", "tfds:x", "x.npz", ""):
        with pytest.raises(ValueError, match="not a path"):
            data.register_dataset(bad, loader)
    data.register_dataset("broken", lambda: arrays)
    with pytest.raises(data.DataError, match="must return a jaxunlearn.data.Dataset"):
        data.load_dataset("broken")


def test_models_by_name():
    assert set(models.ARCHITECTURES) <= set(models.MODELS)
    assert models.make_model("air-s", num_classes=7).num_classes == 7
    assert isinstance(models.make_model("test-mlp", num_classes=4), MLP)
    assert models.register_model("test-mlp", mlp) is mlp  # the same factory again
    with pytest.raises(ValueError, match="taken"):
        models.register_model("test-mlp", cnn)
    with pytest.raises(ValueError, match="register_model"):
        models.make_model("nope")
    assert models.takes_weight(models.make_model("tiny"))
    assert not models.takes_weight(MLP(3)) and not models.takes_weight(CNN(3))


def test_settings_are_checked_against_the_data_and_the_model(monkeypatch):
    feats = features()
    good = tiny(model="test-mlp")
    validation.check(good, feats.n_train, feats.input_shape, feats.classes)
    for name in ("augment", "tta"):
        with pytest.raises(ConfigError, match=f"set {name}=false"):
            validation.check(tiny(model="test-mlp", **{name: True}), 80, (5,), 3)
    with pytest.raises(ConfigError, match="fails on inputs of shape \\[5\\]"):
        validation.check(tiny(model="test-cnn"), 80, (5,), 3)
    with pytest.raises(ConfigError, match="fails on inputs of shape \\[5\\]"):
        validation.check(tiny(model="tiny"), 80, (5,), 3)  # a built-in CNN too
    with pytest.raises(ConfigError, match="register_model"):
        validation.check(tiny(model="nope"), 80, (5,), 3)
    with pytest.raises(ConfigError, match="unknown baseline 'nope'"):
        validation.check(tiny(model="test-mlp", baseline="nope"), 80, (5,), 3)
    monkeypatch.setitem(models.MODELS, "fixed", lambda **_: MLP(3))
    with pytest.raises(ConfigError, match="expected logits \\[1, 4\\].*num_classes"):
        validation.check(tiny(model="fixed"), 80, (5,), 4)
    monkeypatch.setitem(models.MODELS, "counting", lambda **_: Counting())
    with pytest.raises(ConfigError, match="collections \\['counters'\\].*params and batch_stats"):
        validation.check(tiny(model="counting"), 80, (5,), 3)


# --------------------------------------------------------------------------- runs, end to end

def _no_requests(run_dir) -> bool:
    return forgetting.log_text(run_dir) == "no deletion requests recorded"


@pytest.fixture(scope="module")
def feature_run(tmp_path_factory):
    """An MLP ensemble (no BatchNorm, no weight) trained on feature vectors passed in memory,
    under a data setting that names nothing loadable (as in the report)."""
    ds = features(classes=4)
    out = tmp_path_factory.mktemp("features") / "run"
    cfg = tiny(model="test-mlp", data="synthetic")
    driver.train_and_evaluate(cfg, out, dataset=ds, log=lambda s: None, progress=False)
    return out, ds


def test_a_feature_vector_run_records_its_data(feature_run):
    out, ds = feature_run
    results = results_of(out)
    assert results["complete"] and results["data"] == ds.spec
    assert results["data"]["classes"] == 4 and results["data"]["input_shape"] == [5]
    state = group_state(out)
    assert state["batch_stats"] == {}  # a model without BatchNorm statistics
    assert np.asarray(state["params"]["Dense_1"]["kernel"]).shape == (2, 8, 4)  # 2 members
    assert results["final"]["ensemble"]["test_accuracy"] >= 0


def test_a_feature_vector_run_loads_and_predicts_with_its_own_normalisation(feature_run):
    import jaxunlearn

    out, ds = feature_run
    run = jaxunlearn.load(out)
    probs = run.predict(ds.test_images)  # float64 features: cast to the run's float32
    assert probs.shape == (ds.n_test, 4)
    final = results_of(out)["final"]["ensemble"]
    assert np.mean(probs.argmax(1) == ds.test_labels) == pytest.approx(final["test_accuracy"])
    x = np.asarray(run.preprocess(ds.test_images[:3]))
    np.testing.assert_allclose(x, (ds.test_images[:3] - np.asarray(ds.mean)) / np.asarray(ds.std),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(jaxunlearn.trained.PredictError, match=r"\[n, 5\]"):
        run.predict(np.zeros((2, 6), np.float32))
    with pytest.raises(jaxunlearn.trained.PredictError, match="floating point"):
        run.predict(np.zeros((2, 5), np.int64))


def test_forget_needs_the_runs_data_and_records_nothing_without_it(feature_run, tmp_path):
    src, ds = feature_run
    out = tmp_path / "run"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns(".lock"))
    quiet = dict(log=lambda s: None, wait=0.0)
    with pytest.raises(data.DataError, match=r"pass the run's dataset \(dataset=") as e:
        forgetting.forget(out, [1, 2, 3], **quiet)
    assert "arrays passed in memory" in str(e.value)  # what the run was trained on
    with pytest.raises(data.DataError, match=r"not the data .*dataset="):
        forgetting.forget(out, [1, 2, 3], dataset=features(seed=1, classes=4), **quiet)
    other = data.from_arrays(ds.train_images, ds.train_labels, ds.test_images, ds.test_labels,
                             classes=6, mean=ds.mean, std=ds.std)
    with pytest.raises(data.DataError, match=r"other classes .*6 instead of 4"):
        forgetting.forget(out, [1, 2, 3], dataset=other, **quiet)
    with runlock.run_lock(out, purpose="run"):  # held: a request would be recorded at once
        with pytest.raises(data.DataError, match="not the data"):
            forgetting.forget(out, [1, 2, 3], dataset=features(seed=1, classes=4), **quiet)
    assert _no_requests(out)
    with pytest.raises(data.DataError, match="dataset="):
        driver.resume(out, log=lambda s: None, progress=False)

    outcome = forgetting.forget(out, [1, 2, 3], dataset=ds, **quiet)
    assert outcome["status"] == "applied" and outcome["results"]["deleted_ids"] == [1, 2, 3]
    ok, lines, summary = audit(out)
    assert ok, lines
    assert "3 deleted id(s)" in summary
    again = driver.resume(out, dataset=ds, log=lambda s: None, progress=False)
    assert again["deleted_ids"] == [1, 2, 3]


def test_an_image_run_from_an_npz_file_on_the_command_line(tmp_path, capsys, monkeypatch):
    """A small CNN with Flax's BatchNorm on 28x28x1 images in 12 classes, as members and as
    the baseline: run (the file named relative to the working folder), forget and audit
    through the command line from another folder."""
    path = tmp_path / "digits.npz"
    np.savez(path, **dict(zip(data.NPZ_ARRAYS, images())))
    monkeypatch.chdir(tmp_path)
    code = cli.main(["run", "--quiet", "--preset", "smoke", "--out", str(tmp_path / "runs"),
                     "--data", "digits.npz", "model=test-cnn", "baseline=test-cnn", "members=2",
                     "phases=2", "train_limit=0", "test_limit=0", "deletion_rate=0",
                     "batch_size=16", "eval_batch_size=32"])
    assert code == 0
    run_dir = capsys.readouterr().out.strip().splitlines()[-1]
    results = results_of(run_dir)
    assert results["data"]["input_shape"] == [28, 28, 1] and results["data"]["classes"] == 12
    assert json.loads((pathlib.Path(run_dir) / "config.json").read_text())["data"] == \
        str(path.resolve())  # found again from any folder
    assert set(group_state(run_dir, "baseline")["batch_stats"]) == {"BatchNorm_0"}
    monkeypatch.chdir(tmp_path / "runs")  # elsewhere: the recorded path still finds the file
    assert cli.main(["forget", run_dir, "--ids", "4,5"]) == 0
    assert results_of(run_dir)["deleted_ids"] == [4, 5]
    assert cli.main(["audit", run_dir]) == 0
    assert "0 violation(s)" in capsys.readouterr().out
