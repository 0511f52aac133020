"""Lineage through a real run: cumulative across phases (the original study's defect fixed)."""

import numpy as np

from jaxunlearn import data, driver, plans
from jaxunlearn.config import apply_overrides, get_preset


def test_lineage_keeps_earlier_phases_examples(tmp_path):
    # With the subset plan, phase 2 samples only chunk 2; a member that keeps training must
    # still carry the chunk-1 examples it saw in phase 1.
    cfg = apply_overrides(get_preset("smoke"), {
        "plan": "subset", "fraction": 0.5, "phases": 2, "deletion_rate": 0.0,
        "baseline": "none", "eval_every_epoch": False})
    driver.train_and_evaluate(cfg, tmp_path / "run", dataset=data.load_sample(), log=lambda s: None)
    lineage = np.load(tmp_path / "run" / "lineage.npz")["lineage"]
    chunk1, chunk2 = plans.make_chunks(300, 2)
    # Each member saw half of each chunk (without replacement, every drawn id fed once).
    np.testing.assert_array_equal(lineage[:, chunk1].sum(axis=1), [75] * 3)
    np.testing.assert_array_equal(lineage[:, chunk2].sum(axis=1), [75] * 3)
