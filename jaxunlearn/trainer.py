"""Training: one primitive, "train these members of this group on this stage", and its cost.

Every kind of training goes through `Trainer.train`: a phase's stages, `replace`'s retraining
after the last phase, `rewind`'s and the oracle's replays. A stage's samples lose the ids
deleted since it was drawn; member ``i``'s batch order in epoch ``e`` comes from a generator
seeded with ``(seed, track, t, round, e, i)`` (`jaxunlearn.plans.member_rngs`), so a member
retrained on a stage sees exactly the batches it saw the first time, minus deleted ids.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxunlearn import faults, plans, sharding, timing, steps
from jaxunlearn.config import Config, epochs_of
from jaxunlearn.group import ModelGroup
from jaxunlearn.stages import TRACKS, Stage


class Cost(NamedTuple):
    """What some training cost: member-epochs, member-examples fed and wall seconds. Adds up."""

    member_epochs: int = 0
    member_examples: int = 0
    seconds: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":  # a sum, not tuple concatenation
        return Cost(*(a + b for a, b in zip(self, other)))

    def as_dict(self) -> dict:
        return self._asdict()


class Start(NamedTuple):
    """Where training of a stage (re)starts: an epoch, the steps already done in it and their
    loss sums (``[m]``; None at a step 0)."""

    epoch: int = 1
    step: int = 0
    loss: list | None = None


class TrainingDiverged(FloatingPointError):
    """A member's loss became NaN or infinite; says which member, epoch and step."""

    def __init__(self, group: str, members: list[int], epoch: int, step: int,
                 message: str | None = None):
        self.group, self.members, self.epoch, self.step = group, members, epoch, step
        super().__init__(message or f"{group} member(s) {members} reached a non-finite loss "
                                    f"at epoch {epoch}, step {step}")


def check_finite(step_losses: np.ndarray, name: str, epoch: int, offset: int = 0) -> None:
    """Raises `TrainingDiverged` naming the first step (1-based, counting ``offset`` steps
    before ``step_losses`` ``[steps, m]``) where some member's loss is not finite."""
    bad = ~np.isfinite(step_losses)
    if bad.any():
        step = int(np.flatnonzero(bad.any(axis=1))[0])
        raise TrainingDiverged(name, np.flatnonzero(bad[step]).tolist(), epoch,
                               offset + step + 1)


class EpochEnd(NamedTuple):
    """A finished epoch of training, as the trainer reports it to its `Listener`."""

    kind: str  # as `Trainer.train`'s: "epoch" (a phase's own training), "retrain", ...
    group: ModelGroup
    stage: Stage
    epoch: int
    train_loss: list  # each member's mean loss over its samples (None: not training)
    seconds: float  # training seconds of this `Trainer.train` call so far


class Listener:
    """What hears of training as it goes (`Trainer`'s ``listener``): a run's metrics log and
    progress bar (`jaxunlearn.results.EpochLog`). Its time does not count as training time.
    This one hears and does nothing."""

    def started(self, kind: str, epochs: int) -> None:
        """A `Trainer.train` call of ``epochs`` epochs of ``kind`` begins."""

    def epoch_done(self, end: EpochEnd) -> None:
        """An epoch ended (every member's step of it done)."""


class Recipe(NamedTuple):
    """How an approximate unlearning trains (`Trainer.train`'s ``recipe``), in place of the
    phase's own schedule: ``epochs`` at a constant learning rate ``lr_scale`` times the
    configured one, a fresh optimiser state, and ``forget`` (int ids) fed although deleted, each
    with weight ``forget_weight`` (one per member; negative: gradient ascent) and, when
    ``labels`` (int, one per ``forget`` id) is given, that label instead of its own. A
    ``hook`` (`jaxunlearn.steps.StepHook`) changes the step's loss or updates with each
    member's rows of ``aux`` (a pytree of device arrays ``[m, ...]``: SCRUB's teacher logits,
    SalUn's parameter mask), and ``fresh_optimizer=False`` continues the optimiser state of the
    previous call (SCRUB's alternating passes)."""

    epochs: int
    lr_scale: float
    forget: np.ndarray = np.zeros(0, np.int64)
    forget_weight: np.ndarray | float = 1.0
    labels: np.ndarray | None = None
    hook: steps.StepHook | None = None  # the strategy's addition to the step
    aux: object = None  # the hook's per-member arrays, each leaf [m, ...] on the device
    fresh_optimizer: bool = True  # False: go on with the members' optimiser state


class Trainer:
    """Trains members of model groups on stages; tells its ``listener`` as it goes."""

    def __init__(self, cfg: Config, deleted: np.ndarray, listener: Listener | None = None):
        """``deleted``: the run's bool ``[n_train]`` deletion mask (read at every call);
        ``listener`` (`Listener`): hears of each training call and epoch (None: nothing
        does)."""
        self.cfg, self.deleted = cfg, deleted
        self.listener = listener or Listener()

    def train(self, group: ModelGroup, stage: Stage, members: np.ndarray, *,
              kind: str = "epoch", round_: int = 0, start: Start | None = None,
              on_step: Callable | None = None, recipe: Recipe | None = None) -> Cost:
        """Trains ``members`` (bool ``[m]``) of ``group`` on ``stage`` for the configured epochs.

        Some members only train as stacks of their own (`ModelGroup.substacks`): the others are
        not computed, and stay bit-identical. A stage started afresh (``start`` None) at the
        first slice of a phase gives the members a fresh optimiser state when the config resets
        it each phase. ``kind`` names the training in the metrics log (``epoch`` for a phase's
        own training, else ``retrain``, ``rewind``, ``oracle``). After each step of a whole
        group, ``on_step(epoch, steps_done, partial_loss)`` may checkpoint; ``partial_loss()``
        gives the epoch's loss sums so far and raises `TrainingDiverged` if one is not finite.
        A ``recipe`` (`Recipe`) trains as an approximate unlearning does instead.
        Returns the cost, its seconds without compilation, callbacks and evaluation.
        """
        cfg, clock = self.cfg, timing.Clock()
        epochs = recipe.epochs if recipe else epochs_of(cfg, stage.track)
        members = np.asarray(members, bool)
        if (recipe and recipe.fresh_optimizer) or (
                recipe is None and start is None and cfg.reset_optimizer_each_phase
                and stage.slice == 1):
            group.reset_optimizer(members)
        start = start or Start()
        self.listener.started(kind, epochs)
        deleted, forget = self.deleted, None  # forget: bool [n_train], fed although deleted
        if recipe is not None and recipe.forget.size:
            forget = np.zeros(len(self.deleted), bool)
            forget[recipe.forget] = True
            deleted = self.deleted & ~forget
            forget_weight = np.broadcast_to(np.asarray(recipe.forget_weight, np.float32),
                                            (group.members,))
        samples = [s if a else s[:0] for s, a in
                   zip(plans.without(stage.samples, deleted), members)]
        sizes = np.array([len(s) for s in samples])
        parts = group.substacks(members)
        whole = len(parts) == 1 and np.array_equal(parts[0], np.arange(group.members))
        if on_step is not None and not whole:
            raise ValueError("per-step callbacks need the whole group training")
        stacks = [group.state] if whole else [group.gather(sel) for sel in parts]
        actives = [group.place_members(members[sel]) for sel in parts]
        hypers = [group.member_hyper(sel) for sel in parts]  # per-member settings, or None
        seed_key = (cfg.seed, TRACKS[stage.track], stage.t, round_)
        per_step = P(None, sharding.MEMBER_AXIS)
        labels = None
        if recipe is not None and recipe.labels is not None:
            labels = group.place(group.data.relabelled(recipe.forget, recipe.labels),
                                 sharding.REPLICATED)
        for epoch in range(start.epoch, epochs + 1):
            rngs = plans.member_rngs(seed_key, epoch, group.members)
            idx, weight = plans.epoch_batches(rngs, samples, cfg.batch_size)
            if forget is not None:
                weight = np.where(forget[idx], forget_weight[None, :, None], 1.0) * weight
            scale = (self._lr_scales(epoch, epochs, idx.shape[0], sizes) if recipe is None else
                     np.full(idx.shape[:2], recipe.lr_scale, np.float32))
            batches = [(group.place(idx[:, sel], per_step), group.place(weight[:, sel], per_step),
                        None if scale is None else group.place(scale[:, sel], per_step))
                       for sel in parts]
            hook, auxes = None, [None] * len(parts)
            if recipe is not None and recipe.hook is not None:
                hook = recipe.hook
                auxes = [recipe.aux if whole else
                         jax.tree.map(lambda x, sel=sel: x[sel], recipe.aux) for sel in parts]
            resumed = epoch == start.epoch
            offset = start.step if resumed else 0
            carried = (np.asarray(start.loss, np.float64) if resumed and start.loss is not None
                       else np.zeros(group.members))
            losses = [[] for _ in parts]

            def partial_loss(losses=losses, offset=offset, carried=carried, epoch=epoch):
                total = carried.copy()
                for sel, part in zip(parts, losses):
                    if part:
                        per = np.zeros((len(part), group.members))
                        per[:, sel] = np.asarray(sharding.to_host(jnp.stack(part)), np.float64)
                        check_finite(per, group.name, epoch, offset)
                        total += per.sum(axis=0)
                return total

            for s in range(offset, idx.shape[0]):
                for j, (idx_dev, weight_dev, scale_dev) in enumerate(batches):
                    lr = None if scale_dev is None else scale_dev[s]
                    stacks[j], loss = group.step(stacks[j], idx_dev[s], weight_dev[s], actives[j],
                                                 lr, labels=labels, hook=hook, aux=auxes[j],
                                                 hyper=hypers[j])
                    losses[j].append(loss)
                group.lineage.record(idx[s], weight[s], members)
                if whole:
                    group.set_trained(stacks[0], members)
                if on_step is not None:  # a mid-phase checkpoint counts as training time
                    on_step(epoch, s + 1, partial_loss)
                faults.point(f"train.{kind}.step")
            if not whole:  # the group's own state, for the epoch's scores and the caller
                for sel, stack in zip(parts, stacks):
                    group.scatter(stack, sel, np.isin(np.arange(group.members), sel) & members)
            train_loss = partial_loss() / np.maximum(sizes, 1)  # waits for the epoch's steps
            end = EpochEnd(kind, group, stage, epoch,
                           [float(x) if a else None for x, a in zip(train_loss, members)],
                           clock.seconds())
            with clock.paused():  # what the listener does (scoring) is not training time
                self.listener.epoch_done(end)
        return Cost(int(members.sum()) * epochs, int(sizes.sum()) * epochs,
                    clock.seconds())

    def _lr_scales(self, epoch: int, epochs: int, n_steps: int,
                   sizes: np.ndarray) -> np.ndarray | None:
        """Each member's learning-rate multiplier at each step of ``epoch`` of ``epochs``,
        ``[n_steps, m]``, from its own progress through the phase (members with smaller samples
        take fewer steps); None for a constant schedule."""
        cfg = self.cfg
        if cfg.lr_schedule == "constant":
            return None
        per_epoch = np.maximum(-(-sizes // cfg.batch_size), 1)  # each member's steps
        step = np.minimum(np.arange(n_steps)[:, None], per_epoch[None, :] - 1)
        progress = (epoch - 1 + step / per_epoch[None, :]) / epochs
        return steps.lr_scale(cfg.lr_schedule, progress, cfg.lr_warmup).astype(np.float32)
