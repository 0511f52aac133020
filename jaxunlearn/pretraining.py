"""A pretrained initialisation: one model trained on the examples a run declares never
deletable (``pretrain=N``: the last N training examples), which every member of the ensemble
starts from and is reset to when unlearned.

Exactness then rests on one declaration: none of those N examples is ever deleted. The chunks,
shards and deletion schedules never hold them, `forget` refuses them, and the audit checks
that no deleted id is one of them. A member retrained after a deletion starts again from the
same weights, so `rewind` and the oracle still equal each other bit for bit; what a request
costs is the member's fine-tuning on its own data, never the pretraining.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxunlearn import metrics, plans, records
from jaxunlearn.group import ModelGroup, member_fingerprints
from jaxunlearn.results import EpochLog
from jaxunlearn.stages import Stage
from jaxunlearn.trainer import Trainer

# Folded into the run's seed for the pretrained model's key: the ensemble's, the baseline's and
# unlearning's keys (a split of the seed) stay what they are without pretraining.
KEY_SALT = 3


def recipe(cfg):
    """The configuration the pretraining trains under: the members' recipe with the
    ``pretrain_*`` epochs, batch size and learning rate, no evaluation after each epoch."""
    return dataclasses.replace(cfg, epochs=cfg.pretrain_epochs,
                               batch_size=cfg.pretrain_batch_size or cfg.batch_size,
                               learning_rate=cfg.pretrain_lr or cfg.learning_rate,
                               eval_every_epoch=False)


def pretrain(run) -> records.Pretrain:
    """Trains one ``cfg.model`` on the run's never-deletable examples, makes it the
    initialisation of every member of the ensemble (shadow members and the oracle reference
    included), and records it in ``results["pretrain"]`` (returned)."""
    cfg, ens = run.cfg, run.ensemble
    ids = plans.pretraining_ids(ens.data.n_train, cfg.pretrain)
    pre = recipe(cfg)
    # A group of one runs on one device: it shares the ensemble's resident data when that is
    # on one device too, else has its own copy.
    data = ens.data if ens.mesh is None else ens.data.host_dataset()
    key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), KEY_SALT)
    group = ModelGroup("pretrain", "ensemble", cfg.model, 1, pre, key, data)
    trainer = Trainer(pre, run.state.deletions.mask,
                      EpochLog(run.state.report, pre, run.test_labels, run.test_logits))
    # Stage 0 of the ensemble's track: its batch orders are seeded apart from every phase's.
    stage = Stage("ensemble", 0, 0, 1, 1, [ids], None)
    cost = trainer.train(group, stage, np.ones(1, bool), kind="pretrain")
    if group.lineage.seen[:, np.setdiff1d(np.arange(ens.data.n_train), ids)].any():
        raise AssertionError("the pretraining saw a deletable example")
    host = group.host_state()
    base = {"params": jax.tree.map(lambda x: x[0], host.params),
            "batch_stats": jax.tree.map(lambda x: x[0], host.batch_stats)}
    for unit in run.state.units.values():
        if unit.group.track == "ensemble":
            unit.group.set_base(base)
    test = group.member_logits(cfg.eval_batch_size)[0]
    record: records.Pretrain = {
        "ids": [int(ids[0]), int(ids[-1])], "examples": int(len(ids)), "epochs": pre.epochs,
        "batch_size": pre.batch_size, "learning_rate": pre.learning_rate,
        "seconds": cost.seconds, "member_examples": cost.member_examples,
        "test_accuracy": metrics.score(test, run.test_labels)["test_accuracy"],
        "fingerprint": member_fingerprints(host)[0]}
    run.state.report.results["pretrain"] = record
    run.say(f"pretrained the members' initialisation on ids {ids[0]}..{ids[-1]} (never "
            f"deletable): {record['test_accuracy']:.2%} test accuracy in "
            f"{cost.seconds:.0f}s")
    return record
