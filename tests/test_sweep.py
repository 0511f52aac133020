"""The sweep script: grid cells, one real cell end to end, the table and the plots."""

import csv
import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _sweep():
    spec = importlib.util.spec_from_file_location("sweep", ROOT / "experiments" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["sweep"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_grid_cells():
    sweep = _sweep()
    cells = sweep.cells(sweep.GRIDS["cpu"])
    names = [sweep.cell_name(c) for c in cells]
    assert len(names) == len(set(names)) == 30  # (2 plans x 2 M x 2 f + 2 M shards) x 3
    assert all(c["fraction"] == 1.0 for c in cells if c["plan"] == "shards")
    assert {c["strategy"] for c in cells} == {"replace", "rewind", "oracle"}


def test_one_cell_writes_table_and_plots(tmp_path, capsys):
    sweep = _sweep()
    out = tmp_path / "sweep"
    small = ["--set", "train_limit=150", "--set", "test_limit=60", "--set", "phases=3",
             "--set", "epochs=1", "--set", "eval_batch_size=100"]
    assert sweep.main(["--out", str(out), "--only", "shards-m3-f1-", *small]) == 0
    rows = list(csv.DictReader(open(out / "table.csv")))
    assert [r["strategy"] for r in rows] == ["replace", "rewind", "oracle"]
    rewind, oracle = rows[1], rows[2]
    assert rewind["test_acc"] == oracle["test_acc"]  # rewind is exact
    assert float(oracle["speedup_vs_oracle"]) == 1.0
    assert float(rewind["unlearn_member_examples"]) <= float(oracle["unlearn_member_examples"])
    assert (out / "table.md").read_text().startswith("| plan |")
    for name in ("frontier.png", "phases.png", "mia.png"):
        assert (out / "plots" / name).stat().st_size > 5_000
    # A second call reuses the finished cells: it runs none, it only rewrites the outputs.
    capsys.readouterr()
    assert sweep.main(["--out", str(out), "--only", "shards-m3-f1-", *small]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wrote")
