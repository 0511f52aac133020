"""End to end: the smoke preset through the CLI, deletion schedules, bad input."""

import json
import os

import numpy as np
import pytest

import jax

from jaxunlearn import checkpoint, cli, config, data, driver, validation
from jaxunlearn.config import ConfigError, apply_overrides, get_preset

from conftest import results_of


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert cli.main(["run", "--preset", "smoke", "--out", str(root), "--quiet"]) == 0
    (run_dir,) = root.iterdir()
    return run_dir


def test_smoke_run_writes_the_run_folder(smoke_run):
    names = {p.name for p in smoke_run.iterdir()}
    assert {"config.json", "results.json", "metrics.jsonl", "lineage.npz", "plots"} <= names
    assert (smoke_run / "plots" / "accuracy_loss.png").stat().st_size > 10_000
    cfg = json.loads((smoke_run / "config.json").read_text())
    assert cfg["preset"] == "smoke" and cfg["members"] == 3


def test_smoke_results_schema(smoke_run):
    results = results_of(smoke_run)
    assert results["complete"] is True
    assert len(results["phases"]) == 3
    for p, record in enumerate(results["phases"], start=1):
        assert record["phase"] == p
        for group in ("ensemble", "baseline"):
            hits = record[group]["test_accuracy"] * 100  # an accuracy over the 100 test images
            assert abs(hits - round(hits)) < 1e-9
            assert record[group]["test_loss"] > 0.5  # a true mean cross-entropy, not /batch
        assert len(record["members"]) == 3
        assert {"test_accuracy", "test_loss", "valid"} <= set(record["members"][0])
        assert record["seconds"] > 0
        assert [m["valid"] for m in record["members"]] == [
            i not in record["invalidated"] for i in range(3)]
    # replace reinitialises an invalidated member: it is born in the phase that deleted the id
    # (and again if a later deletion invalidates it).
    born = np.load(smoke_run / "lineage.npz")["born"]
    first, second = (set(results["phases"][p]["invalidated"]) for p in (0, 1))
    assert {i for i in range(3) if born[i] == 2} == second
    assert {i for i in range(3) if born[i] == 1} == first - second
    # The smoke preset deletes int(0.01 * 100) = 1 and int(0.01 * 200) = 2 ids after phases 1, 2.
    assert [len(r["deleted_ids"]) for r in results["phases"]] == [1, 2, 0]
    assert results["final"]["phase"] == 3
    assert results["final"]["ensemble"] == results["phases"][-1]["ensemble"]
    assert results["lineage_audit"] == {"ok": True, "exact": True, "violations": 0,
                                        "held_by_design": 0, "members": 3, "deleted": 3}


def test_the_summary_says_what_the_deletions_cost_both_sides(smoke_run):
    from jaxunlearn.results import summary_line

    results = results_of(smoke_run)
    cost, events = results["cost"], [p["cost"] for p in results["phases"] if "cost" in p]
    assert cost["events"] == len(events) == 2
    # retraining the baseline from scratch at each deletion: its own training of the stages
    retraining = cost["baseline"]["retraining"]
    assert retraining["member_examples"] == sum(
        e["baseline"]["oracle"]["member_examples"] for e in events) > 0
    assert retraining["seconds"] == pytest.approx(
        sum(e["baseline"]["oracle"]["seconds"] for e in events))
    line = summary_line(results)
    assert (f"in {cost['seconds']:.1f}s of replace (retraining the ensemble at each deletion: "
            f"{cost['oracle']['seconds']:.1f}s; the baseline: {retraining['seconds']:.1f}s)"
            in line), line


def test_smoke_metrics_log_has_epoch_and_phase_lines(smoke_run):
    lines = [json.loads(l) for l in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    kinds = [l["kind"] for l in lines]
    assert kinds.count("phase") == 3
    assert kinds.count("epoch") == 3 * 2  # 3 phases x 1 epoch x (ensemble, baseline)
    epoch = next(l for l in lines if l["kind"] == "epoch" and l["model"] == "ensemble")
    assert len(epoch["train_loss"]) == 3 and "ensemble" in epoch


def test_no_live_lineage_holds_a_deleted_id(smoke_run):
    saved = np.load(smoke_run / "lineage.npz")
    assert saved["lineage"].shape == (3, 300) and saved["lineage"].dtype == bool
    assert len(saved["deleted"]) == 3
    assert not saved["lineage"][:, saved["deleted"]].any()
    assert saved["lineage"].any(axis=1).all()  # every live member has a lineage


def test_every_run_gets_a_new_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --out, as in `jaxunlearn run --out runs`
    for _ in range(2):
        assert cli.main(["run", "--preset", "smoke", "--out", "runs", "--quiet",
                         "epochs=1", "phases=1", "baseline=none"]) == 0
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 2
    assert all(checkpoint.Checkpoints(r).steps() for r in runs)


def _tiny(**changes):
    return apply_overrides(get_preset("smoke"), {"eval_every_epoch": False, **changes})


def test_explicit_schedule_is_applied_and_leaves_no_deleted_id_in_a_lineage(tmp_path, sample):
    after_last = list(range(200, 230))  # after the last phase: some member surely saw one
    schedule = {"1": [0, 5, 17, 42], "2": [150, 7], "3": after_last}
    path = tmp_path / "deletions.json"
    path.write_text(json.dumps(schedule))
    cfg = _tiny(deletions=str(path), baseline="none", fraction=0.5)
    results = driver.train_and_evaluate(cfg, tmp_path / "run", dataset=sample, log=lambda s: None)
    saved = np.load(tmp_path / "run" / "lineage.npz")
    assert sorted(saved["deleted"].tolist()) == sorted(sum(schedule.values(), []))
    assert not saved["lineage"][:, saved["deleted"]].any()
    assert [r["deleted_ids"] for r in results["phases"]] == [[0, 5, 17, 42], [7, 150], after_last]
    # Deletions after the last phase: the fresh members are retrained at once, on data
    # without the deleted ids, and the final results describe the retrained ensemble.
    last = results["phases"][-1]
    assert last["invalidated"]
    retrained = last["invalidated"]
    assert all(saved["born"][i] == 3 and saved["lineage"][i].any() for i in retrained)
    assert results["final"]["members"] == last["after_unlearning"]["members"]
    assert results["final"]["ensemble"]["members"] == 3
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    retrain = [l for l in lines if l["kind"] == "retrain"]
    assert len(retrain) == cfg.epochs
    assert [i for i, x in enumerate(retrain[0]["train_loss"]) if x is not None] == retrained
    assert results["lineage_audit"]["ok"]


def test_deterministic_given_seed(tmp_path, sample):
    cfg = _tiny(baseline="none", phases=2)
    a = driver.train_and_evaluate(cfg, tmp_path / "a", dataset=sample, log=lambda s: None)
    b = driver.train_and_evaluate(cfg, tmp_path / "b", dataset=sample, log=lambda s: None)
    assert a["phases"][-1]["ensemble"] == b["phases"][-1]["ensemble"]
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "lineage.npz")["lineage"],
                                  np.load(tmp_path / "b" / "lineage.npz")["lineage"])


@pytest.mark.parametrize("changes, message", [
    ({"members": 0}, "members must be at least 1"),
    ({"fraction": 0.001}, "gives each member no data"),
    ({"model": "resnet19"}, "unknown model"),
    ({"strategy": "forget"}, "unknown unlearning strategy"),
    ({"member_parallel": "pmap"}, "member_parallel"),
    ({"member_parallel": "hybrid:2"}, "divisible by 2"),  # 3 members
    ({"devices": jax.device_count() + 1}, f"only {jax.device_count()} device"),
    ({"precision": "fp8"}, "unknown precision"),
])
def test_bad_config_fails_before_writing(tmp_path, sample, changes, message):
    with pytest.raises(ConfigError, match=message):
        driver.train_and_evaluate(_tiny(**changes), tmp_path / "run", dataset=sample)
    assert not (tmp_path / "run").exists()


def test_cli_reports_bad_input_without_creating_a_run(tmp_path, capsys):
    bad = tmp_path / "deletions.json"
    bad.write_text(json.dumps({"1": [99999]}))
    out = tmp_path / "runs"
    assert cli.main(["run", "--preset", "smoke", "--out", str(out), "--deletions", str(bad)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["run", "--preset", "smoke", "--out", str(out), "epochs=two"]) == 2
    assert "epochs takes an integer" in capsys.readouterr().err
    assert cli.main(["run", "--preset", "smoke", "--out", str(out), "colour=red"]) == 2
    assert not out.exists() or not any(out.iterdir())


def test_presets_and_data_commands(capsys):
    assert cli.main(["presets"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in config.PRESETS)
    assert cli.main(["data", "--data", "sample"]) == 0
    assert "airplane" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(config.PRESETS))
def test_every_preset_is_valid_for_its_data(name):
    cfg = config.get_preset(name)
    n_train = 1000 if cfg.data == "sample" else 50_000
    validation.check(cfg, cfg.train_limit or n_train)  # raises ConfigError if a setting cannot work


@pytest.mark.skipif(not os.environ.get(data.ENV_VAR), reason=f"set {data.ENV_VAR} to real CIFAR-10")
def test_smoke_on_real_cifar10_through_the_environment(tmp_path):
    assert cli.main(["run", "--preset", "smoke", "--data", "cifar10", "--out", str(tmp_path),
                     "--quiet", "phases=2"]) == 0
    (run_dir,) = tmp_path.iterdir()
    results = results_of(run_dir)
    assert "binary folder" in results["data_source"]
    assert results["n_train"] == 300 and results["n_test"] == 100
    assert results["lineage_audit"]["ok"]


def test_bounded_compilations_across_phases_deletions_and_sample_sizes(tmp_path, sample):
    from jaxunlearn.group import group_functions

    schedule = tmp_path / "deletions.json"
    schedule.write_text(json.dumps({"1": [3], "2": [150, 7], "3": [250, 260, 270]}))
    cfg = _tiny(baseline="none", strategy="rewind", member_parallel="vmap", stem="cifar",
                optimizer="sgd", learning_rate=0.0137, deletions=str(schedule), fraction=0.5,
                oracle_reference="none")  # a learning rate no other test compiles with
    fns = group_functions(cfg, cfg.model, cfg.members, cfg.devices)  # the run's own functions
    # gather and scatter are one jitted function for every setting: count what this run adds
    before = {name: getattr(fns, name)._cache_size() for name in ("gather", "scatter")}
    results = driver.train_and_evaluate(cfg, tmp_path / "run", dataset=sample,
                                        log=lambda s: None)
    assert len({r["sample_size"] for r in results["phases"]}) == 3
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    retrained = {sum(x is not None for x in l["train_loss"]) for l in lines
                 if l["kind"] == "rewind"}
    assert min(retrained) < cfg.members  # some retraining ran as a sub-stack
    assert fns is group_functions(cfg, cfg.model, cfg.members, cfg.devices)
    # Once per stack size: 3 members under pow2 are the whole stack, and sub-stacks of 2 and 1.
    assert 2 <= fns.step._cache_size() <= 3 and fns.logits._cache_size() <= 3
    added = {name: getattr(fns, name)._cache_size() - before[name] for name in before}
    assert added["gather"] <= 2 and added["scatter"] <= 2
    assert fns.init._cache_size() == 1 and fns.reset_optimizer._cache_size() == 1
