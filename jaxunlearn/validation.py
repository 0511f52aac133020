"""A configuration checked before anything is trained or written: every setting against its
declared rule (`jaxunlearn.config.RULES`, the plug-ins' settings included), then what depends
on several settings, the data, the registries (models, strategies, evaluators, member layouts)
and the devices; each strategy and evaluator checks what it needs itself (`check`), and the
plug-ins the run names must be importable again (`jaxunlearn.plugins.record`).

It sits above those modules; `jaxunlearn.config` (the settings and presets) imports nothing of
the package but the plug-ins declaring settings (`jaxunlearn.config.BUILTIN_PLUGINS`).
"""

from __future__ import annotations

import functools

import numpy as np

from jaxunlearn import config as config_lib, ensemble, evaluators, plans, plugins, sharding
from jaxunlearn import strategies
from jaxunlearn.config import Config, ConfigError
from jaxunlearn.models import ARCHITECTURES, MODELS, PRECISIONS, check_model
from jaxunlearn.steps import make_optimizer


def check(cfg: Config, n_train: int, input_shape: tuple = (32, 32, 3),
          classes: int = 10) -> None:
    """Rejects settings that cannot work with ``n_train`` training examples of
    ``input_shape`` in ``classes`` classes, before anything is trained or written (ConfigError
    saying what to change)."""
    def need(ok, message):
        if not ok:
            raise ConfigError(message)

    wrong = config_lib.problems(cfg)  # every setting against its declared rule
    need(not wrong, "; ".join(wrong))
    register = "or register yours (jaxunlearn.models.register_model)"
    need(cfg.baseline == "none" or cfg.baseline in MODELS,
         f"unknown baseline {cfg.baseline!r}; choose none or one of {sorted(MODELS)}, {register}")
    need(cfg.model in MODELS, f"unknown model {cfg.model!r}; choose one of {sorted(MODELS)}, "
                              f"{register}")
    if len(input_shape) != 3:
        for name in ("augment", "tta"):
            need(not getattr(cfg, name),
                 f"{name}={getattr(cfg, name)} crops and mirrors images [H, W, C], and this "
                 f"data's examples have shape {list(input_shape)}; set {name}=false")
    for arch in sorted({cfg.model, cfg.baseline} - {"none"}):
        if arch in ARCHITECTURES and tuple(input_shape) == (32, 32, 3):
            continue  # made for these inputs (and tracing a ResNet-152 takes seconds)
        try:
            _check_model(arch, MODELS[arch], tuple(input_shape), classes, cfg.stem,
                         cfg.precision)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.shadow_members:
        need("lira" in cfg.evaluators,
             f"shadow_members={cfg.shadow_members} trains members for the lira evaluator only; "
             f"add lira to evaluators (e.g. evaluators=scores,mia,lira) or set shadow_members=0")
        need(cfg.plan != "shards", "shadow members draw samples of their own, which SISA's "
                                   "disjoint shards cannot give; use plan bootstrap or subset")
        need(not (cfg.plan == "subset" and cfg.fraction >= 1),
             "shadow members need examples they did not train on, and plan subset with "
             "fraction 1 trains every member on every example; lower the fraction")
    each = [n for n in config_lib.PER_MEMBER if isinstance(getattr(cfg, n), tuple)
            and len(set(getattr(cfg, n))) > 1]  # given per member, with values that differ
    if each:
        listed = ", ".join(each)
        need(cfg.baseline == "none",
             f"{listed} differ(s) between members, but the baseline is one model trained with "
             f"one value; set baseline=none for a per-member sweep, or give one value")
        need(not cfg.pretrain or cfg.pretrain_lr or "learning_rate" not in each,
             f"pretrain={cfg.pretrain} trains one model for every member to start from, with "
             f"one learning rate (pretrain_lr=0 means learning_rate, which differs between "
             f"members); set pretrain_lr, e.g. pretrain_lr="
             f"{max(np.atleast_1d(cfg.learning_rate)):g}")
        ignored = {"momentum": cfg.optimizer != "sgd", "weight_decay": cfg.optimizer == "adam"}
        idle = [n for n in each if ignored.get(n)]
        need(not idle, f"{', '.join(idle)} differ(s) between members, but optimizer="
                       f"{cfg.optimizer} does not use {' or '.join(idle)}: every member would "
                       f"train alike; use optimizer=sgd (momentum, weight decay) or adamw "
                       f"(weight decay), or give one value")
        others = [n for n in each if n != "learning_rate"]
        need(not cfg.pretrain or not others,
             f"pretrain={cfg.pretrain} trains one model with the members' recipe, but "
             f"{', '.join(others)} differ(s) between members; give one value, or set pretrain=0")
    need(cfg.slices == 1 or cfg.plan == "shards",
         f"slices={cfg.slices} needs plan=shards (the other plans have one stage per phase)")
    need(cfg.plan != "shards" or cfg.fraction == 1,
         f"plan=shards trains each member on its whole shard (1/members of each chunk); "
         f"set fraction=1 (got {cfg.fraction})")
    need(cfg.pretrain < n_train,
         f"pretrain (the examples declared never deletable) must be less than the {n_train} "
         f"training examples, got {cfg.pretrain}")
    try:  # the deletable examples in chunks, one per phase
        chunks = plans.make_chunks(n_train, cfg.phases, cfg.pretrain)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        for strategy in strategies.for_run(cfg).values():
            strategy.check(cfg, n_train)
        for evaluator in evaluators.make(cfg):
            evaluator.check(n_train)
        plugins.record(cfg)
        stacked = cfg.members + cfg.shadow_members  # the ensemble's stack
        member_parallel = ensemble.resolve_layout(cfg.member_parallel, arch=cfg.model,
                                                  stem=cfg.stem, members=stacked)
        per_device = stacked
        if cfg.devices != 1:
            mesh = sharding.member_mesh(cfg.devices)
            sharding.check_divisible(stacked, mesh)
            per_device = stacked // mesh.size
        make_optimizer(cfg.optimizer, 1.0)  # the name (the values are checked by their rules)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    k = ensemble.hybrid_group_size(member_parallel)
    if k:
        need(per_device % k == 0, f"member_parallel={member_parallel} needs the members of each "
                                  f"device ({per_device}) divisible by {k}; choose K dividing "
                                  f"{per_device}")
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
                            f"{phase} ({n_train - cfg.pretrain} examples in {cfg.phases} "
                            f"phases); raise the fraction")


@functools.lru_cache(maxsize=64)
def _check_model(arch, factory, input_shape, classes, stem, precision) -> None:
    """`jaxunlearn.models.check_model`, once per model factory and data shape."""
    del factory  # (a key only: a name registered again is checked again)
    check_model(arch, input_shape, classes, stem, PRECISIONS[precision])
