"""The command line's paths: settings from flags, resume, exit codes, forget from a file,
the preset listing."""

import json

import pytest

from jaxunlearn import cli, config, driver
from jaxunlearn.config import apply_overrides, get_preset

from conftest import results_of


def _only_run(parent):
    runs = [p for p in parent.iterdir() if p.is_dir()]
    assert len(runs) == 1
    return runs[0]


def test_presets_are_aligned_and_verbose_lists_every_setting(capsys):
    assert cli.main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(config.PRESETS)
    starts = {line.index(config.PRESET_HELP[line.split()[0]]) for line in lines}
    assert len(starts) == 1  # every description starts in the same column
    assert cli.main(["presets", "-v"]) == 0
    out = capsys.readouterr().out
    for name, cfg in config.PRESETS.items():
        for field in config.RULES:  # the strategies' and evaluators' settings included
            assert f"{field} = {getattr(cfg, field)}" in out
    assert out.count("pretrain = 0") == len(config.PRESETS)


def test_the_default_preset_is_the_demo():
    args = cli.build_parser().parse_args(["run"])
    assert cli.resolve_config(args) == get_preset("demo")


def test_run_takes_seed_data_and_repeated_set(tmp_path, capsys):
    assert cli.main(["run", "--preset", "smoke", "--out", str(tmp_path), "--seed", "3",
                     "--data", "sample", "--set", "keep_checkpoints=2", "--set", "phases=2",
                     "baseline=none", "--quiet"]) == 0
    run = _only_run(tmp_path)
    assert capsys.readouterr().out.strip() == str(run)  # --quiet: only the folder
    assert run.name.startswith("smoke-") and run.name.endswith("-seed3")
    saved = json.loads((run / "config.json").read_text())
    assert (saved["seed"], saved["data"], saved["keep_checkpoints"], saved["phases"],
            saved["baseline"]) == (3, "sample", 2, 2, "none")
    results = results_of(run)
    assert results["complete"] and len(results["phases"]) == 2


def test_resume_through_the_cli_finishes_a_stopped_run(tmp_path, sample, capsys):
    cfg = apply_overrides(get_preset("smoke"), {"baseline": "none"})
    out = tmp_path / "run"
    driver.train_and_evaluate(cfg, out, dataset=sample, log=lambda s: None, progress=False,
                              stop_after_phase=1)
    assert not results_of(out)["complete"]
    # --seed cannot change on resume: refused, nothing changed
    assert cli.main(["run", "--resume", str(out), "--seed", "4"]) == 2
    assert "cannot change on --resume" in capsys.readouterr().err
    # an override needs --allow-config-change
    assert cli.main(["run", "--resume", str(out), "eval_batch_size=50"]) == 2
    assert "--allow-config-change" in capsys.readouterr().err
    assert cli.main(["run", "--resume", str(out), "--quiet"]) == 0
    results = results_of(out)
    assert results["complete"] and [p["phase"] for p in results["phases"]] == [1, 2, 3]


def test_a_diverging_run_exits_3_and_says_how_to_resume(tmp_path, capsys):
    assert cli.main(["run", "--preset", "smoke", "--out", str(tmp_path), "--quiet",
                     "learning_rate=1e38", "optimizer=sgd", "phases=2"]) == 3
    err = capsys.readouterr().err
    assert "training diverged" in err and "--resume" in err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    parent = tmp_path_factory.mktemp("cli-finished")
    assert cli.main(["run", "--preset", "smoke", "--out", str(parent), "baseline=none",
                     "strategy=rewind", "oracle_reference=none", "--quiet"]) == 0
    return _only_run(parent)


def test_forget_from_an_ids_file_with_a_wait(finished, tmp_path, capsys):
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("5\n17, 42\n")
    assert cli.main(["forget", str(finished), "--ids-file", str(ids_file), "--wait", "5"]) == 0
    out = capsys.readouterr().out
    assert "applied: 3 id(s) deleted" in out and "durable after" in out
    assert cli.main(["audit", str(finished)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("ok:")
    # the same ids again: refused, exit 2
    assert cli.main(["forget", str(finished), "--ids-file", str(ids_file)]) == 2
    assert "already deleted" in capsys.readouterr().err
    missing = tmp_path / "none.txt"
    assert cli.main(["forget", str(finished), "--ids-file", str(missing)]) == 2
    assert "cannot read the ids file" in capsys.readouterr().err


def test_a_forget_killed_midway_is_finished_by_the_next_open(finished, tmp_path, capsys):
    # killed after the deletion's checkpoint, before the purge and the log's outcome
    fault = "checkpoint.before_purge@1"
    import os
    import pathlib
    import shutil
    import subprocess
    import sys

    from jaxunlearn import deletion_log, faults

    run = tmp_path / "run"
    shutil.copytree(finished, run, ignore=shutil.ignore_patterns(".lock"))
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), **{faults.ENV_VAR: fault})
    killed = subprocess.run([sys.executable, "-m", "jaxunlearn.cli", "forget", str(run),
                             "--ids", "11,12"], env=env, capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL at the fault
    assert cli.main(["audit", str(run)]) == 1  # the request is not finished: a violation
    capsys.readouterr()
    assert cli.main(["run", "--resume", str(run), "--quiet"]) == 0  # finishes it
    assert cli.main(["audit", str(run)]) == 0
    with deletion_log.DeletionLog.open(run, create=False) as log:
        (mine,) = [r for r in log.records() if r["ids"] == [11, 12]]
    assert mine["outcome"] == "applied"
    results = results_of(run)
    assert {11, 12} <= set(results["deleted_ids"]) and results["lineage_audit"]["ok"]
