"""Run in a subprocess by test_default_opt.py, at XLA's default optimisation level (the level
users compile at; the rest of the suite turns the backend's optimisation off): the bit-for-bit
claims with the fast recipe (air-s, SGD with Nesterov, onecycle, label smoothing, augmentation,
flip TTA) on SISA shards with slices.

    python tests/default_opt_worker.py OUT_DIR   # prints "default-opt ok"
"""

import json
import os
import pathlib
import sys

import chex
import jax
import numpy as np

from jaxunlearn import checkpoint, data, driver, plans, records
from jaxunlearn.config import apply_overrides, get_preset


def final_state(run: pathlib.Path) -> dict:
    ckpts = checkpoint.Checkpoints(run, read_only=True)
    try:
        tree, _ = ckpts.load(ckpts.steps()[-1])
    finally:
        ckpts.close()
    state = tree["groups"]["ensemble"]["state"]
    return {"params": state["params"], "batch_stats": state["batch_stats"]}


def main(out: pathlib.Path) -> None:
    assert "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")
    sample = data.load_sample()
    base = apply_overrides(get_preset("air-s-single"), {
        "data": "sample", "train_limit": 160, "test_limit": 60, "members": 2, "phases": 2,
        "plan": "shards", "fraction": 1.0, "slices": 2, "epochs": 1, "batch_size": 16,
        "learning_rate": 0.2, "eval_batch_size": 60, "baseline": "none",
        "oracle_reference": "none", "evaluators": "scores", "keep_checkpoints": 10,
        "strategy": "rewind"})
    assert base.augment and base.tta and base.optimizer == "sgd" and base.lr_schedule == "onecycle"
    quiet = dict(dataset=sample, log=lambda s: None, progress=False)
    # A run that deletes nothing; the deletions are ids of member 0's shard only (after phase
    # 1: one of phase 1's; after phase 2: two of phase 2's), so member 1 is never touched.
    runs = {"none": out / "none"}
    driver.train_and_evaluate(base, runs["none"], **quiet)
    seen = np.load(runs["none"] / "lineage.npz")["lineage"]
    mine = np.flatnonzero(seen[0] & ~seen[1])
    first = np.isin(mine, plans.make_chunks(base.train_limit, base.phases)[0])
    schedule = out / "deletions.json"
    schedule.write_text(json.dumps({"1": mine[first][:1].tolist(),
                                    "2": mine[~first][:2].tolist()}))
    with_deletions = apply_overrides(base, {"deletions": str(schedule)})
    # the rewind run stops after phase 1 and is resumed by a new open of its folder
    runs["rewind"] = out / "rewind"
    driver.train_and_evaluate(with_deletions, runs["rewind"], stop_after_phase=1, **quiet)
    driver.resume(runs["rewind"], dataset=sample, log=lambda s: None, progress=False)
    runs["oracle"] = out / "oracle"
    driver.train_and_evaluate(apply_overrides(with_deletions, {"strategy": "oracle"}),
                              runs["oracle"], **quiet)

    rewind = final_state(runs["rewind"])
    # rewind (stopped and resumed) equals retraining from scratch without the ids (in one go),
    # bit for bit: so both rewind = oracle and resumed = uninterrupted hold
    chex.assert_trees_all_equal(rewind, final_state(runs["oracle"]))
    # the members no deletion touched are the members of a run that deleted nothing
    results = records.load(runs["rewind"] / "results.json")
    assert records.problems(results) == [], records.problems(results)
    hit = sorted({m for p in results["phases"] for m in p["invalidated"]})
    untouched = [m for m in range(base.members) if m not in hit]
    assert (hit, untouched) == ([0], [1])
    none = final_state(runs["none"])
    rows = lambda tree: jax.tree.map(lambda x: np.asarray(x)[untouched], tree)
    chex.assert_trees_all_equal(rows(rewind), rows(none))
    changed = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a)[hit],
                                                           np.asarray(b)[hit]), rewind, none)
    assert any(jax.tree.leaves(changed))  # the rewound members did change
    print("default-opt ok")


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
