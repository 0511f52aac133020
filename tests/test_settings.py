"""Every setting's declaration (`jaxunlearn.config.RULES`) drives its validation, the resume,
fork and report rules, the modules' choices and the preset listing: checked setting by setting."""

import dataclasses
import math
import pathlib

import pytest

from jaxunlearn import config, ensemble, metrics, models, plans, strategies, steps
from jaxunlearn.config import RULES, ConfigError, apply_overrides, get_preset
from jaxunlearn.validation import check

SMOKE = get_preset("smoke")
N_TRAIN = 300


def _out_of_range(rule) -> list:
    """Values just outside each bound the rule declares."""
    values = []
    for bound, step in ((rule.at_least, -1), (rule.above, 0), (rule.at_most, 0.5),
                        (rule.below, 0)):
        if bound is not None:
            values.append(bound + step)
    return values


BAD = [(name, value) for name, rule in RULES.items() for value in _out_of_range(rule)]
BAD += [(name, math.nan) for name, rule in RULES.items()
        if RULES[name] and isinstance(getattr(SMOKE, name), float)]
BAD += [(name, "nonsense") for name, rule in RULES.items() if rule.choices or rule.registry]


def test_every_setting_has_a_rule_with_help():
    fields = [f.name for f in dataclasses.fields(config.Config) if f.name != "plugin_settings"]
    assert list(RULES) == fields + list(config.declared())
    assert all(RULES[f].help for f in RULES)
    assert len(BAD) > 60  # the table below covers every bound, choice and float


@pytest.mark.parametrize("name, value", BAD, ids=[f"{n}={v}" for n, v in BAD])
def test_a_setting_outside_its_rule_is_refused_naming_it(name, value):
    cfg = dataclasses.replace(SMOKE, **{name: value})
    with pytest.raises(ConfigError, match=name):
        check(cfg, N_TRAIN)


@pytest.mark.parametrize("name", [n for n, r in RULES.items() if _out_of_range(r)])
def test_the_bounds_themselves_are_accepted(name):
    rule = RULES[name]
    for bound in (rule.at_least, rule.at_most):
        if bound is None or (name == "pretrain" and bound) or name == "devices":
            continue
        value = type(getattr(SMOKE, name))(bound)
        assert rule.problem(name, value) is None, (name, value)


def test_every_preset_follows_the_rules():
    for name, preset in config.PRESETS.items():
        assert config.problems(preset) == [], name


def test_the_modules_take_the_declared_choices():
    assert plans.PLANS == config.choices("plan")
    assert metrics.AGGREGATIONS == config.choices("aggregation")
    assert models.STEMS == config.choices("stem")
    assert set(models.PRECISIONS) == set(config.choices("precision"))
    assert ("auto",) + ensemble.SUBSTACK_POLICIES == config.choices("substacks")
    assert steps.LR_SCHEDULES == config.choices("lr_schedule")
    assert strategies.BASELINE_UNLEARNING == config.choices("baseline_unlearning")
    for name in config.choices("optimizer"):
        steps.make_optimizer(name, 0.1)
    with pytest.raises(ValueError):
        steps.make_optimizer("lion", 0.1)


def test_resume_fork_and_report_rules_derive_from_the_declarations():
    assert config.RESUMABLE_CHANGES == {n for n, r in RULES.items() if r.resume}
    assert "learning_rate" in config.RESUMABLE_CHANGES - config.FORK_CHANGES  # trains
    assert "strategy" in config.FORK_CHANGES & config.COMPARABLE_CHANGES
    assert not config.FORK_CHANGES & {n for n, r in RULES.items() if r.trains}
    for never in ("model", "members", "plan", "seed", "pretrain", "deletions"):
        assert never not in config.RESUMABLE_CHANGES | config.UNLEARNING_CHANGES
        assert never not in config.COMPARABLE_CHANGES


def test_overrides_keep_the_key_value_form():
    cfg = apply_overrides(SMOKE, ["members=4", "tta=yes", "learning_rate=0.5"])
    assert (cfg.members, cfg.tta, cfg.learning_rate) == (4, True, 0.5)
    with pytest.raises(ConfigError, match="members takes an integer"):
        apply_overrides(SMOKE, ["members=four"])


def test_the_presets_are_described_once_and_the_docs_list_them():
    assert set(config.PRESET_HELP) == set(config.PRESETS)
    root = pathlib.Path(__file__).resolve().parents[1]
    text = (root / "docs" / "configuration.md").read_text()
    section = text[text.index("### Presets"):]
    section = section[:section.index("\n\n", section.index("| preset |"))]
    listed = [line.split("|")[1].strip().split("`")[1] for line in section.splitlines()
              if line.startswith("| `")]
    assert sorted(listed) == sorted(config.PRESETS)
    readme = (root / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in config.PRESETS)


@pytest.mark.parametrize("name, value", [("members", "5"), ("tta", 1), ("learning_rate", "0.1"),
                                         ("members", True), ("plan", 3)])
def test_a_setting_of_the_wrong_type_is_refused(name, value):
    with pytest.raises(ConfigError, match=f"{name} takes"):
        check(dataclasses.replace(SMOKE, **{name: value}), N_TRAIN)
