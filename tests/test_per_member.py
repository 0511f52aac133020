"""Per-member settings: one stacked ensemble as a sweep of learning rate, weight decay, momentum
and label smoothing. Parsing and errors; every layout trains each member with its own values,
as a stack where every member has them would; rewind still equals the oracle bit for bit; the
results report each member's values."""

import dataclasses
import json

import chex
import jax
import numpy as np
import pytest

from conftest import assert_same_models, group_state, results_of
from jaxunlearn import config, driver, validation
from jaxunlearn.config import ConfigError, apply_overrides, get_preset
from jaxunlearn.group import ModelGroup, compile_group
from jaxunlearn.stages import Stage
from jaxunlearn.trainer import Trainer

M = 2


def _smoke(**changes):
    return apply_overrides(get_preset("smoke"), {"baseline": "none", "eval_every_epoch": False,
                                                 **changes})


# ---- the setting ---------------------------------------------------------------------------

def test_comma_separated_values_parse_to_a_tuple_and_one_value_means_all():
    cfg = apply_overrides(get_preset("smoke"), ["learning_rate=0.1,0.05,0.02",
                                                "momentum=0.9", "label_smoothing=0.1,"
                                                "0.2,0"])
    assert cfg.learning_rate == (0.1, 0.05, 0.02) and cfg.momentum == 0.9
    assert cfg.label_smoothing == (0.1, 0.2, 0.0)
    assert config.problems(cfg) == []
    hash(cfg)  # still a hashable frozen config
    # A list in the API is kept as a tuple; a single value as that value.
    api = apply_overrides(get_preset("smoke"), {"weight_decay": [0.0, 5e-4, 1e-3],
                                                "learning_rate": [0.2]})
    assert api.weight_decay == (0.0, 5e-4, 1e-3) and api.learning_rate == 0.2
    assert dataclasses.replace(cfg, momentum=[0.5, 0.6, 0.7]).momentum == (0.5, 0.6, 0.7)
    assert config.member_values(cfg, "momentum", 3) == (0.9, 0.9, 0.9)
    assert config.varying(cfg, 3) == {"learning_rate": (0.1, 0.05, 0.02),
                                      "label_smoothing": (0.1, 0.2, 0.0)}
    # config.json round-trips: a JSON list loads back as the tuple.
    assert config.Config(**json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize("overrides, message", [
    (["learning_rate=0.1,x"], "one per member separated by commas"),
    (["epochs=2,3"], "epochs takes an integer"),
    ({"epochs": [2, 3]}, "epochs takes one value"),
])
def test_bad_values_fail_to_parse(overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(get_preset("smoke"), overrides)


@pytest.mark.parametrize("changes, message", [
    ({"learning_rate": "0.1,0.05"}, r"learning_rate has 2 values; give one value for every "
                                    r"member or 3, one per stacked member"),
    ({"learning_rate": "0.1,0.05,0.02", "shadow_members": 1},
     r"or 4, one per stacked member \(members=3, then shadow_members=1\)"),
    ({"momentum": "0.9,1.5,0.5"}, "momentum must be in"),
    ({"learning_rate": "0.1,0,0.2"}, "learning_rate must be more than 0"),
])
def test_per_member_problems_name_the_count_and_each_value(changes, message):
    cfg = apply_overrides(get_preset("smoke"), changes)
    assert any(__import__("re").search(message, p) for p in config.problems(cfg)), \
        config.problems(cfg)


@pytest.mark.parametrize("changes, message", [
    ({"baseline": "tiny"}, "set baseline=none"),
    ({"pretrain": 60}, "set pretrain_lr, e.g. pretrain_lr=0.1"),
    ({"pretrain": 60, "pretrain_lr": 0.05, "momentum": "0.9,0.8,0.7", "optimizer": "sgd"},
     "momentum differ.* give one value, or set pretrain=0"),
    ({"momentum": "0.9,0.8,0.7"}, "optimizer=adam does not use momentum"),  # a sweep of nothing
    ({"weight_decay": "0,1e-4,1e-3"}, "optimizer=adam does not use weight_decay"),
])
def test_what_trains_one_model_asks_for_one_value(changes, message):
    cfg = apply_overrides(get_preset("smoke"), {"learning_rate": "0.1,0.05,0.02",
                                                "baseline": "none", **changes})
    with pytest.raises(ConfigError, match=message):
        validation.check(cfg, 300)


def test_a_sweep_shares_one_compilation():
    first = compile_group("tiny", "cifar", "fp32", "sgd", (0.1, 0.05), 0.0, "unroll", False,
                          members=2)
    other = compile_group("tiny", "cifar", "fp32", "sgd", [0.3, 0.2], 0.0, "unroll", False,
                          members=2)
    uniform = compile_group("tiny", "cifar", "fp32", "sgd", (0.1, 0.1), 0.0, "unroll", False,
                            members=2)
    assert first is other
    assert uniform is compile_group("tiny", "cifar", "fp32", "sgd", 0.1, 0.0, "unroll", False,
                                    members=2)


# ---- training --------------------------------------------------------------------------------

def _train(sample, layout, optimizer, **settings):
    """``M`` tiny members (the same initial state and batches whatever the settings) trained for
    one epoch with ``settings``: their parameters."""
    cfg = _smoke(**{"members": M, "model": "tiny", "stem": "cifar", "member_parallel": layout,
                    "batch_size": 8, "epochs": 1, "optimizer": optimizer,
                    "lr_schedule": "onecycle", **settings})
    ds = sample.limit(64, 8)
    group = ModelGroup("ensemble", "ensemble", "tiny", M, cfg, jax.random.PRNGKey(0),
                       (ds.train_images, ds.train_labels, ds.test_images, ds.test_labels))
    stage = Stage("ensemble", 1, 1, 1, 1, [np.arange(i * 16, i * 16 + 12) for i in range(M)],
                  None)
    Trainer(cfg, np.zeros(64, bool)).train(group, stage, np.ones(M, bool))
    return jax.tree.map(np.asarray, group.state.params)


def _member(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


SWEEPS = {"sgd": {"learning_rate": (0.1, 0.03), "momentum": (0.9, 0.5),
                  "weight_decay": (0.0, 1e-3)},
          "adamw": {"learning_rate": (1e-3, 3e-3), "weight_decay": (1e-2, 0.0)}}


@pytest.mark.parametrize("layout, optimizer", [("unroll", "sgd"), ("vmap", "adamw"),
                                               ("map", "sgd"), ("hybrid:2", "sgd")])
def test_each_member_trains_as_a_stack_of_its_own_values_would(sample, layout, optimizer):
    """Each member of the mixed stack equals the same member of a stack where every member has
    its values, to float32 rounding: a compiled-in value is a constant XLA may fold and
    reorder with the schedule's scale, where a traced one is a multiplication of its own, so
    the two round apart in the last bits (each setting alone under a constant schedule is
    bit-identical). Each member is far from what the other member's values give."""
    sweep = SWEEPS[optimizer]
    mixed = _train(sample, layout, optimizer, **sweep)
    alone = [_train(sample, layout, optimizer, **{k: v[i] for k, v in sweep.items()})
             for i in range(M)]
    for i in range(M):
        chex.assert_trees_all_close(_member(mixed, i), _member(alone[i], i), rtol=1e-5,
                                    atol=1e-6)
        other = alone[1 - i]
        assert max(float(np.abs(a - b).max()) for a, b in zip(
            jax.tree.leaves(_member(mixed, i)), jax.tree.leaves(_member(other, i)))) > 1e-4


def test_a_learning_rate_alone_is_bit_identical(sample):
    """Under a constant schedule a traced learning rate computes what the compiled-in one does,
    bit for bit."""
    mixed = _train(sample, "unroll", "sgd", learning_rate=(0.1, 0.03), lr_schedule="constant")
    for i, lr in enumerate((0.1, 0.03)):
        alone = _train(sample, "unroll", "sgd", learning_rate=lr, lr_schedule="constant")
        chex.assert_trees_all_equal(_member(mixed, i), _member(alone, i))


def test_per_member_label_smoothing(sample):
    """Label smoothing per member: a member with 0 computes what the plain loss does, bit for
    bit; one with a smoothing of its own agrees with the compiled-in value to float32 rounding
    (the compiled-in share of the other labels, smoothing / classes, is folded in double
    precision on the host; the traced one is computed in float32 and may round one bit
    apart)."""
    mixed = _train(sample, "unroll", "sgd", label_smoothing=(0.0, 0.2), learning_rate=0.05)
    plain = _train(sample, "unroll", "sgd", label_smoothing=0.0, learning_rate=0.05)
    smooth = _train(sample, "unroll", "sgd", label_smoothing=0.2, learning_rate=0.05)
    chex.assert_trees_all_equal(_member(mixed, 0), _member(plain, 0))
    chex.assert_trees_all_close(_member(mixed, 1), _member(smooth, 1), rtol=1e-5, atol=1e-6)
    assert not np.allclose(jax.tree.leaves(_member(mixed, 1))[0],
                           jax.tree.leaves(_member(plain, 1))[0])


# ---- a run -----------------------------------------------------------------------------------

def test_rewind_equals_the_oracle_with_per_member_learning_rates(tmp_path, sample):
    schedule = tmp_path / "deletions.json"
    schedule.write_text(json.dumps({"1": [3, 40], "2": [150, 7]}))
    lrs = (1e-3, 3e-3, 5e-4)
    finals = {}
    for strategy in ("rewind", "oracle"):
        cfg = _smoke(strategy=strategy, deletions=str(schedule), fraction=0.5,
                     learning_rate=",".join(map(str, lrs)), oracle_reference="none")
        out = tmp_path / strategy
        driver.train_and_evaluate(cfg, out, dataset=sample, log=lambda s: None,
                                  progress=False)
        results = results_of(out)  # held to the declared records
        assert results["cost"]["member_epochs"] > 0
        assert results["config"]["learning_rate"] == list(lrs)
        for record in (results["final"]["members"], results["phases"][0]["members"]):
            assert [m["settings"] for m in record] == [{"learning_rate": lr} for lr in lrs]
        finals[strategy] = group_state(out)
    assert_same_models(finals["rewind"], finals["oracle"])
    # Its config.json loads back as the same config.
    (run,) = (tmp_path / "rewind").glob("**/config.json")
    assert config.Config(**json.loads(run.read_text())).learning_rate == lrs


def test_uniform_values_record_no_settings(tmp_path, sample):
    cfg = _smoke(phases=1, deletion_rate=0.0, oracle_reference="none",
                 learning_rate="0.001,0.001,0.001")
    driver.train_and_evaluate(cfg, tmp_path / "u", dataset=sample, log=lambda s: None,
                              progress=False)
    results = results_of(tmp_path / "u")
    assert all("settings" not in m for m in results["final"]["members"])


def test_a_resume_whose_settings_change_the_saved_states_shape_is_refused_unchanged(tmp_path,
                                                                                  sample):
    cfg = _smoke(optimizer="sgd", weight_decay=0.0, phases=2, deletion_rate=0.0,
                 oracle_reference="none")
    out = tmp_path / "run"
    driver.train_and_evaluate(cfg, out, dataset=sample, log=lambda s: None, progress=False,
                              stop_after_phase=1)
    saved = (out / "config.json").read_text()
    with pytest.raises(config.ConfigError, match="does not fit the changed weight_decay.*"
                                                 "resume without it. Nothing was changed"):
        driver.resume(out, ["weight_decay=0,5e-4,0"], allow_config_change=True, dataset=sample,
                      log=lambda s: None, progress=False)
    assert (out / "config.json").read_text() == saved  # the run still opens as it was
    assert driver.resume(out, dataset=sample, log=lambda s: None, progress=False)["complete"]
