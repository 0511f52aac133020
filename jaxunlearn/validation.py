"""A configuration checked against the data and the parts that implement its choices (plans,
models, strategies, evaluators, layouts, devices), before anything is trained or written.

It sits above those modules; `jaxunlearn.config` (the settings and presets) imports nothing of
the package.
"""

from __future__ import annotations

import numpy as np

from jaxunlearn import ensemble, evaluators, metrics, plans, sharding, strategies
from jaxunlearn.config import BASELINE_PLANS, ORACLE_REFERENCES, Config, ConfigError
from jaxunlearn.models import ARCHITECTURES, PRECISIONS, STEMS
from jaxunlearn.train import LR_SCHEDULES, make_optimizer


def check(cfg: Config, n_train: int) -> None:
    """Rejects settings that cannot work with ``n_train`` training examples, before anything
    is trained or written (ConfigError saying what to change)."""
    def need(ok, message):
        if not ok:
            raise ConfigError(message)

    def choice(name, value, options):
        need(value in options, f"unknown {name} {value!r}; choose one of {', '.join(options)}")

    need(cfg.members >= 1, f"members must be at least 1, got {cfg.members}")
    need(cfg.phases >= 1, f"phases must be at least 1, got {cfg.phases}")
    need(cfg.epochs >= 1, f"epochs must be at least 1, got {cfg.epochs}")
    need(cfg.baseline_epochs >= 0, f"baseline_epochs must be 0 (as epochs) or more, got "
         f"{cfg.baseline_epochs}")
    need(cfg.batch_size >= 1 and cfg.eval_batch_size >= 1, "batch sizes must be at least 1")
    need(cfg.shadow_members >= 0, f"shadow_members must be 0 or more, got {cfg.shadow_members}")
    if cfg.shadow_members:
        need("lira" in cfg.evaluators,
             f"shadow_members={cfg.shadow_members} trains members for the lira evaluator only; "
             f"add lira to evaluators (e.g. evaluators=scores,mia,lira) or set shadow_members=0")
        need(cfg.plan != "shards", "shadow members draw samples of their own, which SISA's "
                                   "disjoint shards cannot give; use plan bootstrap or subset")
        need(not (cfg.plan == "subset" and cfg.fraction >= 1),
             "shadow members need examples they did not train on, and plan subset with "
             "fraction 1 trains every member on every example; lower the fraction")
    need(cfg.unlearn_epochs >= 1, f"unlearn_epochs (of the approximate strategies) must be at "
                                  f"least 1, got {cfg.unlearn_epochs}")
    need(np.isfinite(cfg.unlearn_lr) and cfg.unlearn_lr > 0,
         f"unlearn_lr (the approximate strategies' learning rate, a multiple of learning_rate) "
         f"must be positive, got {cfg.unlearn_lr}")
    need(0 < cfg.neggrad_beta < 1, f"neggrad_beta (NegGrad+'s weight of the retained loss) must "
                                   f"be in (0, 1), got {cfg.neggrad_beta}")
    need(0 <= cfg.salun_sparsity < 1, f"salun_sparsity (the share of weights SalUn leaves "
                                      f"unchanged) must be in [0, 1), got {cfg.salun_sparsity}")
    need(cfg.strategy != "scrub" or cfg.devices == 1,
         f"strategy=scrub distils on one device; set devices=1 (got {cfg.devices})")
    need(cfg.model in ARCHITECTURES, f"unknown model {cfg.model!r}; choose one of {sorted(ARCHITECTURES)}")
    need(cfg.baseline == "none" or cfg.baseline in ARCHITECTURES,
         f"unknown baseline {cfg.baseline!r}; choose none or one of {sorted(ARCHITECTURES)}")
    need(cfg.stem in STEMS, f"unknown stem {cfg.stem!r}; choose one of {STEMS}")
    need(cfg.precision in PRECISIONS,
         f"unknown precision {cfg.precision!r}; choose one of {sorted(PRECISIONS)}")
    choice("plan", cfg.plan, plans.PLANS)
    choice("substacks", cfg.substacks, ("auto",) + ensemble.SUBSTACK_POLICIES)
    choice("aggregation", cfg.aggregation, metrics.AGGREGATIONS)
    choice("oracle_reference", cfg.oracle_reference, ORACLE_REFERENCES)
    choice("baseline_plan", cfg.baseline_plan, BASELINE_PLANS)
    choice("baseline_unlearning", cfg.baseline_unlearning, strategies.BASELINE_UNLEARNING)
    need(0 < cfg.fraction <= 1 and 0 < cfg.baseline_fraction <= 1, "fractions must be in (0, 1]")
    need(0 <= cfg.deletion_rate < 1, f"deletion_rate must be in [0, 1), got {cfg.deletion_rate}")
    need(cfg.slices >= 1, f"slices must be at least 1, got {cfg.slices}")
    need(cfg.slices == 1 or cfg.plan == "shards",
         f"slices={cfg.slices} needs plan=shards (the other plans have one stage per phase)")
    need(cfg.plan != "shards" or cfg.fraction == 1,
         f"plan=shards trains each member on its whole shard (1/members of each chunk); "
         f"set fraction=1 (got {cfg.fraction})")
    need(np.isfinite(cfg.learning_rate) and cfg.learning_rate > 0,
         f"learning_rate must be a positive number, got {cfg.learning_rate}")
    choice("lr_schedule", cfg.lr_schedule, LR_SCHEDULES)
    need(0 <= cfg.lr_warmup < 1, f"lr_warmup must be in [0, 1), got {cfg.lr_warmup}")
    need(0 <= cfg.label_smoothing < 1,
         f"label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
    need(0 <= cfg.momentum < 1, f"momentum must be in [0, 1), got {cfg.momentum}")
    need(cfg.checkpoint_every >= 0, f"checkpoint_every must be 0 (phase ends only) or a number "
                                    f"of steps, got {cfg.checkpoint_every}")
    need(cfg.keep_checkpoints >= 1, f"keep_checkpoints must be at least 1, got "
                                    f"{cfg.keep_checkpoints}")
    need(cfg.retain_eval >= 1, f"retain_eval must be at least 1, got {cfg.retain_eval}")
    need(cfg.mia_folds >= 2, f"mia_folds must be at least 2, got {cfg.mia_folds}")
    need(0 <= cfg.pretrain < n_train,
         f"pretrain (the examples declared never deletable) must be in [0, {n_train}), got "
         f"{cfg.pretrain}")
    need(cfg.pretrain_epochs >= 1, f"pretrain_epochs must be at least 1, got "
                                   f"{cfg.pretrain_epochs}")
    need(cfg.pretrain_batch_size >= 0, f"pretrain_batch_size must be 0 (as batch_size) or "
                                       f"more, got {cfg.pretrain_batch_size}")
    need(np.isfinite(cfg.pretrain_lr) and cfg.pretrain_lr >= 0,
         f"pretrain_lr must be 0 (as learning_rate) or positive, got {cfg.pretrain_lr}")
    n_train -= cfg.pretrain  # the deletable examples: all the phases see
    need(n_train >= cfg.phases, f"{n_train} deletable training examples cannot fill "
                                f"{cfg.phases} phases")
    try:
        strategies.for_run(cfg)
        evaluators.names(cfg)
        stacked = cfg.members + cfg.shadow_members  # the ensemble's stack
        member_parallel = ensemble.resolve_strategy(cfg.member_parallel, arch=cfg.model,
                                                    stem=cfg.stem, members=stacked)
        per_device = stacked
        if cfg.devices != 1:
            mesh = sharding.member_mesh(cfg.devices)
            sharding.check_divisible(stacked, mesh)
            per_device = stacked // mesh.size
        make_optimizer(cfg.optimizer, cfg.learning_rate, cfg.weight_decay)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    k = ensemble.hybrid_group_size(member_parallel)
    if k:
        need(per_device % k == 0, f"member_parallel={member_parallel} needs the members of each "
                                  f"device ({per_device}) divisible by {k}; choose K dividing "
                                  f"{per_device}")
    chunks = plans.make_chunks(n_train, cfg.phases)
    nothing_deleted = np.zeros(n_train, bool)
    for plan, fraction, who in ((cfg.plan, cfg.fraction, "each member"),
                                (cfg.baseline_plan, cfg.baseline_fraction, "the baseline")):
        if (who == "the baseline" and cfg.baseline == "none") or plan == "full":
            continue
        for phase in range(1, cfg.phases + 1):
            size = plans.sample_size(plan, fraction, chunks, phase, nothing_deleted,
                                     cfg.members, cfg.slices)
            if plan == "shards":
                need(size >= 1, f"plan shards with {cfg.members} members and {cfg.slices} "
                                f"slice(s) leaves a member no data in phase {phase} "
                                f"({len(chunks[phase - 1])} examples in its chunk); use fewer "
                                f"members or slices, or more data")
            need(size >= 1, f"plan {plan!r} with fraction {fraction} gives {who} no data in phase "
                            f"{phase} ({n_train} examples in {cfg.phases} phases); raise the fraction")
