"""Pure single-member training and evaluation steps, and the optimiser recipes.

Everything here works on ONE member; `jaxunlearn.ensemble` lifts it over the member axis.
Images stay uint8 on the device; a step gathers its batch by index from the resident arrays,
so the host only ships small index arrays.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxunlearn.config import choices
from jaxunlearn.data import CIFAR10_MEAN, CIFAR10_STD

PRNGKey = jax.Array
Params = Any


class MemberState(NamedTuple):
    """Training state of one member. In an ensemble every leaf gains a leading member axis."""

    params: Params
    batch_stats: Any
    opt_state: optax.OptState
    step: jax.Array  # int32 scalar: training steps since this member's last initialisation
    key: PRNGKey  # the member's own key (augmentation, dropout-like randomness)


def make_optimizer(name: str, learning_rate: float, weight_decay: float = 0.0,
                   momentum: float = 0.9) -> optax.GradientTransformation:
    """Optimiser recipes: ``adam`` (the original study: Adam, constant lr), ``adamw``, ``sgd``
    (Nesterov momentum, decoupled from nothing: weight decay adds to the gradient). A learning
    rate schedule multiplies the final update (`train_step`'s ``lr_scale``).

    The settings may be traced scalars (one member's own values, inside the stacked step): the
    optimiser state's structure does not depend on them, except that a traced ``weight_decay``
    puts `sgd`'s weight decay in the chain (it is traced when some member has one)."""
    if name == "adam":
        return optax.adam(learning_rate)
    if name == "adamw":
        return optax.adamw(learning_rate, weight_decay=weight_decay)
    if name == "sgd":
        decays = isinstance(weight_decay, jax.Array) or weight_decay
        chain = [optax.add_decayed_weights(weight_decay)] if decays else []
        return optax.chain(*chain, optax.sgd(learning_rate, momentum=momentum, nesterov=True))
    raise ValueError(f"unknown optimizer {name!r}; choose adam, adamw or sgd")


def normalize(images_u8: jax.Array) -> jax.Array:
    """uint8 ``[..., 32, 32, 3]`` -> float32 standardised by the CIFAR-10 channel statistics."""
    x = images_u8.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(CIFAR10_MEAN)) / jnp.asarray(CIFAR10_STD)


def augment(key: PRNGKey, images: jax.Array, pad: int = 4) -> jax.Array:
    """Random crop with zero padding and random horizontal flip, per image. ``[b, h, w, c]``."""
    b, h, w, _ = images.shape
    k_crop, k_flip = jax.random.split(key)
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * pad + 1)
    crop = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1])))
    images = crop(padded, offsets)
    flip = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1, :], images)


def init_member(model: nn.Module, tx: optax.GradientTransformation, key: PRNGKey) -> MemberState:
    """A freshly initialised member: parameters, batch statistics, optimiser state, step 0."""
    k_params, k_member = jax.random.split(key)
    variables = model.init(k_params, jnp.zeros((1, 32, 32, 3), jnp.float32), train=False)
    params = variables["params"]
    return MemberState(params=params, batch_stats=variables["batch_stats"],
                       opt_state=tx.init(params), step=jnp.zeros((), jnp.int32), key=k_member)


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
    """Per-example cross-entropy ``[b]`` (natural log), against labels smoothed by
    ``smoothing`` (the true label keeps ``1 - smoothing`` plus its share of the rest; a traced
    scalar, one member's own, takes the smoothed path whatever its value)."""
    if isinstance(smoothing, (int, float)) and not smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    classes = logits.shape[-1]
    target = optax.smooth_labels(jax.nn.one_hot(labels, classes), smoothing)
    return optax.softmax_cross_entropy(logits, target)


# SCRUB's distillation (Kurmanji et al. 2023, their code's defaults): temperature, and the weights
# of the KL divergence and of the cross-entropy on the retained examples.
SCRUB_T, SCRUB_ALPHA, SCRUB_GAMMA = 4.0, 0.001, 0.99


def distill_kl(student: jax.Array, teacher: jax.Array, temperature: float) -> jax.Array:
    """Per-example ``KL(softmax(teacher / T) || softmax(student / T)) * T**2`` ``[b]`` (Hinton
    et al.'s scaling keeps its gradient's size independent of ``T``)."""
    t = jax.nn.log_softmax(teacher.astype(jnp.float32) / temperature)
    s = jax.nn.log_softmax(student.astype(jnp.float32) / temperature)
    return jnp.sum(jnp.exp(t) * (t - s), axis=-1) * temperature ** 2


def lr_scale(schedule: str, progress, warmup: float = 0.2):
    """The learning-rate multiplier at ``progress`` (the fraction of a phase's training done,
    in [0, 1]): ``constant`` 1; ``onecycle`` rises linearly from 0.1 to 1 over the first
    ``warmup`` of the phase, then falls linearly to 0 (numpy or jax arrays)."""
    if schedule == "constant":
        return progress * 0 + 1.0
    if schedule == "onecycle":
        up = 0.1 + 0.9 * progress / max(warmup, 1e-9)
        down = (1.0 - progress) / max(1.0 - warmup, 1e-9)
        return up * (progress < warmup) + down * (progress >= warmup)
    raise ValueError(f"unknown lr_schedule {schedule!r}; choose constant or onecycle")


LR_SCHEDULES = choices("lr_schedule")  # as the setting declares them


def train_step(model: nn.Module, tx: optax.GradientTransformation, use_augment: bool,
               state: MemberState, images: jax.Array, labels: jax.Array, idx: jax.Array,
               weight: jax.Array, active: jax.Array, lr_scale: jax.Array | None = None,
               label_smoothing: float = 0.0,
               teacher: jax.Array | None = None) -> tuple[MemberState, jax.Array]:
    """One optimiser step of one member on the examples ``images[idx]``.

    Args:
      state: the member's state.
      images, labels: the resident training set, uint8 ``[n, 32, 32, 3]`` and int ``[n]``.
      idx: int32 ``[b]`` example ids of this batch (padding entries may hold any valid id).
      weight: float32 ``[b]``, 1 for real examples and 0 for padding; a negative weight makes
        the step ascend that example's loss (BatchNorm and the mean use its absolute value).
      active: bool scalar; an inactive member (or an all-padding batch) is returned unchanged.
      lr_scale: float scalar multiplying the update (a learning-rate schedule), or a pytree
        like ``params`` of per-parameter multipliers (a mask of the parameters that may
        change, times the schedule: SalUn); None: 1.
      label_smoothing: smoothing of the training labels (static, or the member's own traced
        scalar).
      teacher: float ``[n, classes]``: a teacher's logits on the resident examples, for
        distillation (SCRUB): an example's loss is then `SCRUB_GAMMA` x cross-entropy plus
        `SCRUB_ALPHA` x the teacher-student KL divergence at temperature `SCRUB_T`, or, with a
        negative weight, the KL divergence alone (ascended: the student moves away from the
        teacher there). None: plain cross-entropy.

    Returns:
      The new state and the batch's weighted loss sum (so epoch means are exact).
    """
    with jax.named_scope("input"):  # scopes name the step's parts in profiles
        x = images[idx]
        if use_augment:
            x = augment(jax.random.fold_in(state.key, state.step), x)
        x = normalize(x)
        y = labels[idx]

    mass = jnp.abs(weight)  # a negative weight ascends that example's loss (NegGrad+)

    def loss_fn(params):
        logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, x,
                                      train=True, weight=mass, mutable=["batch_stats"])
        with jax.named_scope("loss"):
            loss = cross_entropy(logits, y, label_smoothing)
            if teacher is not None:
                kl = distill_kl(logits, teacher[idx], SCRUB_T)
                loss = jnp.where(weight < 0, kl, SCRUB_GAMMA * loss + SCRUB_ALPHA * kl)
            total = jnp.sum(loss * weight)
            return total / jnp.maximum(jnp.sum(mass), 1.0), (updates["batch_stats"], total)

    grads, (batch_stats, total) = jax.grad(loss_fn, has_aux=True)(state.params)
    with jax.named_scope("optimizer"):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        if lr_scale is not None:
            if jax.tree.structure(lr_scale) == jax.tree.structure(updates):  # per parameter
                updates = jax.tree.map(lambda u, r: u * r.astype(u.dtype), updates, lr_scale)
            else:
                updates = jax.tree.map(lambda u: u * lr_scale.astype(u.dtype), updates)
        new = MemberState(params=optax.apply_updates(state.params, updates),
                          batch_stats=batch_stats, opt_state=opt_state, step=state.step + 1,
                          key=state.key)
        take = jnp.logical_and(active, jnp.sum(mass) > 0)
        new = jax.tree.map(lambda n, o: jnp.where(take, n, o), new, state)
    return new, jnp.where(take, total, 0.0)


def loss_grads(model: nn.Module, state: MemberState, images: jax.Array, labels: jax.Array,
               idx: jax.Array, weight: jax.Array) -> Params:
    """The gradient of one member's weighted cross-entropy sum on ``images[idx]`` (no label
    smoothing, no augmentation; BatchNorm in training mode, its statistics left as they are)
    with respect to its parameters: SalUn's saliency."""
    x, y = normalize(images[idx]), labels[idx]

    def loss_fn(params):
        logits, _ = model.apply({"params": params, "batch_stats": state.batch_stats}, x,
                                train=True, weight=weight, mutable=["batch_stats"])
        return jnp.sum(cross_entropy(logits, y) * weight)

    return jax.grad(loss_fn)(state.params)


def eval_logits(model: nn.Module, state: MemberState, images: jax.Array,
                idx: jax.Array, flip: bool = False) -> jax.Array:
    """Logits ``[b, classes]`` of one member (BatchNorm in inference mode) on ``images[idx]``;
    with ``flip``, the mean of the logits of each image and of its mirror image (test-time
    augmentation)."""
    x = normalize(images[idx])
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits = model.apply(variables, x, train=False)
    if flip:
        logits = 0.5 * (logits + model.apply(variables, x[:, :, ::-1, :], train=False))
    return logits
