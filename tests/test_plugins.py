"""Plug-ins: a strategy and an evaluator defined in a module of their own, with their settings,
run through the command line and reopened by every command in new processes (which import
the module again, or stop naming it); and the member step's hook (`steps.StepHook`)."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxunlearn import config, ensemble, plugins, steps
from jaxunlearn.config import ConfigError, apply_overrides, get_preset
from jaxunlearn.models import make_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULE = "gaplug_test_module"
SOURCE = '''
"""Gradient ascent on the forgotten ids, and an evaluator counting them: plug-ins."""
from jaxunlearn.config import ConfigError, setting
from jaxunlearn.evaluators import Evaluator
from jaxunlearn.strategies.approximate import Approximate
from jaxunlearn.trainer import Recipe


class GradAscent(Approximate):
    name = "gradascent"
    uses_forget = True
    settings = {"ascent_weight": setting(1.0, "gradascent: the weight of a forgotten example, "
                                              "ascended", above=0, unlearning=True,
                                         compare=True)}

    def check(self, cfg, n_train):
        if cfg.ascent_weight > 100:
            raise ConfigError("ascent_weight above 100 diverges; lower it")

    def recipe(self, ctx, rounds, retain, held, forget):
        return Recipe(ctx.cfg.unlearn_epochs, ctx.cfg.unlearn_lr, forget,
                      -ctx.cfg.ascent_weight)


class ForgetCount(Evaluator):
    name = "forget_count"
    settings = {"count_times": setting(1, "forget_count: multiplies the count", at_least=1,
                                       resume=True)}

    def run(self, evaluation):
        n = len(evaluation.sets["forget"][0]) * self.cfg.count_times
        return {"forget_count": {m.name: {"n": n} for m in evaluation.models}}
'''
SMALL = ["--preset", "smoke", "train_limit=150", "test_limit=50", "members=2", "baseline=none",
         "eval_every_epoch=false", "deletion_rate=0.02", "eval_batch_size=50",
         "oracle_reference=deletions"]


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plugin")
    (folder / f"{MODULE}.py").write_text(SOURCE)
    return folder


@pytest.fixture
def imported(plugin_dir, monkeypatch):
    """The plug-in module imported in this process."""
    monkeypatch.syspath_prepend(str(plugin_dir))
    __import__(MODULE)
    return sys.modules[MODULE]


def _cli(args, *paths, ok=True):
    """``jaxunlearn ARGS`` in a new process with the package and ``paths`` importable."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *map(str, paths)]))
    done = subprocess.run([sys.executable, "-m", "jaxunlearn.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    if ok:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_a_plugin_run_is_reopened_by_every_command_in_a_new_process(tmp_path, plugin_dir):
    out = tmp_path / "runs"
    _cli(["run", "--plugin", MODULE, "--out", out, "--quiet", *SMALL, "strategy=gradascent",
          "ascent_weight=2", "evaluators=scores,forget_count"], plugin_dir)
    (run,) = out.iterdir()
    saved = json.loads((run / "config.json").read_text())
    assert saved["ascent_weight"] == 2.0 and saved["count_times"] == 1
    assert saved["plugins"] == [
        {"kind": "strategy", "name": "gradascent", "module": MODULE},
        {"kind": "evaluator", "name": "forget_count", "module": MODULE}]
    results = json.loads((run / "results.json").read_text())
    assert results["config"] == saved and results["deleted_ids"]
    assert results["forget_count"]["ensemble"]["n"] == len(results["deleted_ids"])
    deleted = set(results["deleted_ids"])
    free = next(i for i in range(150) if i not in deleted)

    # Each command in a new process imports the recorded module again.
    _cli(["forget", run, "--ids", free], plugin_dir)
    assert free in json.loads((run / "results.json").read_text())["deleted_ids"]
    assert "approximately" in _cli(["audit", run], plugin_dir).stdout
    _cli(["report", run, "--out", tmp_path / "report"], plugin_dir)
    assert "gradascent" in (tmp_path / "report" / "table.md").read_text()
    _cli(["run", "--resume", run, "count_times=3", "--allow-config-change"], plugin_dir)
    assert json.loads((run / "config.json").read_text())["count_times"] == 3

    # Without the module, each says which one it needs (and changes nothing).
    before = (run / "config.json").read_text()
    for args in (["forget", run, "--ids", free + 1], ["audit", run],
                 ["report", run, "--out", tmp_path / "report2"], ["run", "--resume", run],
                 ["fork", run, tmp_path / "copy"]):
        done = _cli(args, ok=False)
        assert done.returncode == 2, (args, done.stderr[-2000:])
        assert f"module '{MODULE}'" in done.stderr and "PYTHONPATH" in done.stderr, done.stderr
    assert (run / "config.json").read_text() == before
    assert not (tmp_path / "copy").exists() and not (tmp_path / "report2").exists()


def test_a_plugin_named_by_run_plugin_must_be_importable(tmp_path):
    done = _cli(["run", "--plugin", "no_such_plugin_module", "--out", tmp_path, *SMALL], ok=False)
    assert done.returncode == 2 and "no_such_plugin_module" in done.stderr
    assert not any(tmp_path.iterdir())


def test_presets_verbose_lists_a_plugins_settings(plugin_dir):
    listing = _cli(["presets", "-v", "--plugin", MODULE], plugin_dir).stdout
    line = next(x for x in listing.splitlines() if "ascent_weight = 1.0" in x)
    assert "ascended" in line and f"{MODULE}.GradAscent" in line
    assert "count_times = 1" in listing
    assert "ascent_weight" not in _cli(["presets", "-v"]).stdout


def test_a_plugins_settings_are_declared_validated_and_recorded(imported):
    from jaxunlearn.validation import check

    smoke = get_preset("smoke")
    cfg = apply_overrides(smoke, ["strategy=gradascent", "ascent_weight=3"])
    assert cfg.ascent_weight == 3.0 and cfg.to_dict()["ascent_weight"] == 3.0
    # Only a config that uses the plug-in has its settings; the package's are always there.
    assert "ascent_weight" not in smoke.to_dict() and smoke.ascent_weight == 1.0
    assert {"unlearn_epochs", "neggrad_beta", "salun_sparsity", "mia_folds",
            "retain_eval"} <= set(smoke.to_dict())
    assert config.owner("ascent_weight") == f"{MODULE}.GradAscent"
    assert "ascent_weight" in config.UNLEARNING_CHANGES & config.COMPARABLE_CHANGES
    assert plugins.record(cfg) == [{"kind": "strategy", "name": "gradascent",
                                    "module": MODULE}]
    assert plugins.record(smoke) == [] and "plugins" not in plugins.describe(smoke)
    check(cfg, 300)
    with pytest.raises(ConfigError, match="ascent_weight must be more than 0"):
        check(apply_overrides(cfg, ["ascent_weight=-1"]), 300)
    with pytest.raises(ConfigError, match="ascent_weight takes a number"):
        apply_overrides(cfg, ["ascent_weight=much"])
    with pytest.raises(ConfigError, match="above 100 diverges"):  # the strategy's own check
        check(apply_overrides(cfg, ["ascent_weight=200"]), 300)
    with pytest.raises(ConfigError, match="count_times must be at least 1"):
        check(apply_overrides(smoke, ["evaluators=scores,forget_count", "count_times=0"]), 300)


def test_a_setting_declared_twice_differently_or_over_a_core_one_is_refused():
    taken = {"neggrad_beta": config.setting(0.5, "another beta", above=0)}
    with pytest.raises(ConfigError, match="neggrad_beta.*another name"):
        config.declare(taken, "elsewhere.Other", "strategies", "other")
    with pytest.raises(ConfigError, match="core configuration"):
        config.declare({"epochs": config.setting(1, "epochs")}, "elsewhere.Other")
    with pytest.raises(ConfigError, match="unknown setting 'nonsense_setting'"):
        apply_overrides(get_preset("smoke"), ["nonsense_setting=1"])
    assert config.problems(config.Config(nonsense_setting=1)) == [
        "unknown setting 'nonsense_setting': no imported plug-in declares it; import the "
        "module that does (--plugin MODULE) or drop it"]


def test_a_config_json_of_the_package_alone_loads_and_equals_its_config(tmp_path):
    from jaxunlearn.run import saved_config

    cfg = apply_overrides(get_preset("protocol"), ["neggrad_beta=0.9"])
    (tmp_path / "config.json").write_text(plugins.config_json(cfg))
    assert saved_config(tmp_path) == cfg and saved_config(tmp_path).retain_eval == 2000
    assert saved_config(tmp_path) != get_preset("protocol")


def _member_step(hook=None, aux=None, members=2):
    model, tx = make_model("tiny", "imagenet"), optax.sgd(0.1)
    state = ensemble.init_ensemble(model, tx, jax.random.PRNGKey(0), members)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, 8))
    idx = jnp.tile(jnp.arange(8, dtype=jnp.int32), (members, 1))
    step = jax.jit(ensemble.make_train_step(model, tx, "vmap"), static_argnames="hook")
    new, loss = step(state, images, labels, idx, jnp.ones((members, 8)),
                     jnp.ones(members, bool), None, aux, hook=hook)
    return state, new, loss


def _masked(mask, updates):
    return jax.tree.map(lambda u, m: u * m, updates, mask)


def _scaled(scale, logits, labels, idx, weight, loss):
    return loss * scale[idx]


MASK = steps.StepHook(updates=_masked)
SCALE = steps.StepHook(loss=_scaled)


def test_the_step_hook_changes_the_loss_and_updates_with_each_members_aux():
    before, plain, plain_loss = _member_step()
    ones = jax.tree.map(jnp.ones_like, before.params)
    # Member 0 may change nothing, member 1 everything: member 1 is the plain step's, bit for
    # bit; member 0's parameters stay (its batch statistics follow the data).
    mask = jax.tree.map(lambda x: x.at[0].set(0.0), ones)
    _, masked, masked_loss = _member_step(MASK, mask)
    row = lambda tree, i: jax.tree.map(lambda x: np.asarray(x[i]), tree)
    jax.tree.map(np.testing.assert_array_equal, row(masked.params, 1), row(plain.params, 1))
    jax.tree.map(np.testing.assert_array_equal, row(masked.params, 0), row(before.params, 0))
    np.testing.assert_array_equal(masked_loss, plain_loss)
    assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(row(plain.params, 0)),
                                              jax.tree.leaves(row(before.params, 0))))
    # A loss hook: member 0's examples weigh 1 (the plain step), member 1's 0 (no gradient).
    scale = jnp.stack([jnp.ones(8), jnp.zeros(8)])
    _, scaled, scaled_loss = _member_step(SCALE, scale)
    jax.tree.map(np.testing.assert_array_equal, row(scaled.params, 0), row(plain.params, 0))
    jax.tree.map(np.testing.assert_array_equal, row(scaled.params, 1), row(before.params, 1))
    assert scaled_loss[0] == plain_loss[0] and scaled_loss[1] == 0


def test_a_plugin_of_a_script_is_recorded_and_reopened_only_where_it_is_registered():
    from jaxunlearn import models

    def factory(num_classes, **_):
        return make_model("tiny", num_classes=num_classes)

    factory.__module__ = "__main__"  # as a script or notebook defines it
    models.MODELS["script-net"] = factory
    try:
        cfg = apply_overrides(get_preset("smoke"), {"model": "script-net"})
        entries = plugins.record(cfg)
        assert entries == [{"kind": "model", "name": "script-net", "module": "__main__"}]
        plugins.load(entries, "config.json")  # registered here: nothing to import
    finally:
        del models.MODELS["script-net"]
    with pytest.raises(ConfigError, match=r"defined in module '__main__' \(a script or "
                                          r"notebook\).*register the model here before opening"):
        plugins.load(entries, "config.json")


def test_report_compares_a_plugin_strategys_run_with_a_builtin_ones():
    from jaxunlearn import comparison

    base = get_preset("smoke").to_dict()
    rewind = {"data_fingerprint": "f", "data_source": "s", "config": {**base}}
    mine = {"data_fingerprint": "f", "data_source": "s",
            "config": {**base, "strategy": "mine", "mine_weight": 2.0}}  # its own setting
    comparison.check({"rewind": rewind, "mine": mine})  # in either order
    comparison.check({"mine": mine, "rewind": rewind})
    longer = {**rewind, "config": {**base, "epochs": 9}}
    with pytest.raises(comparison.ReportError, match="epochs=9 vs 1"):
        comparison.check({"rewind": rewind, "longer": longer})


def test_a_partial_of_a_package_function_is_recorded_as_its_registrants():
    import functools

    from jaxunlearn import models

    models.register_model("tiny-partial", functools.partial(models.make_model, "tiny"))
    try:
        cfg = apply_overrides(get_preset("smoke"), {"model": "tiny-partial"})
        assert plugins.record(cfg) == [{"kind": "model", "name": "tiny-partial",
                                        "module": __name__}]
    finally:
        del models.MODELS["tiny-partial"], models.ORIGINS["tiny-partial"]
    with pytest.raises(ConfigError, match="'no_such_package.sub', which this process cannot"):
        plugins.load([{"kind": "model", "name": "x", "module": "no_such_package.sub"}], "f")


def test_a_plugin_may_not_take_a_builtins_name():
    from jaxunlearn.evaluators import REGISTRY as EVALUATORS, Evaluator
    from jaxunlearn.strategies import Strategy
    from jaxunlearn.strategies.base import REGISTRY as STRATEGIES

    builtin = STRATEGIES["rewind"]
    with pytest.raises(TypeError, match="strategy name 'rewind' is taken by "
                                        "jaxunlearn.strategies.rewind.Rewind"):
        type("Mine", (Strategy,), {"name": "rewind", "__module__": "mine"})
    assert STRATEGIES["rewind"] is builtin
    with pytest.raises(TypeError, match="evaluator name 'mia' is taken"):
        type("Mine", (Evaluator,), {"name": "mia", "__module__": "mine"})
    assert EVALUATORS["mia"].__module__ == "jaxunlearn.evaluators.membership"


def test_a_config_takes_settings_by_name_only():
    with pytest.raises(TypeError, match="Config takes settings by name"):
        config.Config("smoke")
