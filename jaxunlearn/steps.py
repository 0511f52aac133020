"""Pure single-member training and evaluation steps, and the optimiser recipes.

Everything here works on ONE member; `jaxunlearn.ensemble` lifts it over the member axis.
Images stay uint8 on the device; a step gathers its batch by index from the resident arrays,
so the host only ships small index arrays.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxunlearn.config import choices
from jaxunlearn.data import CIFAR10_MEAN, CIFAR10_STD
from jaxunlearn.models import takes_weight

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


Stats = tuple  # (mean, std): the input normalisation per last axis, tuples of floats
CIFAR10_STATS: Stats = (CIFAR10_MEAN, CIFAR10_STD)


def normalize(images: jax.Array, stats: Stats = CIFAR10_STATS) -> jax.Array:
    """Inputs ``[..., c]`` -> float32 ``(x - mean) / std`` per last axis, with ``stats`` the
    ``(mean, std)`` (`jaxunlearn.data.Dataset.stats`; default CIFAR-10's) and ``x`` the pixel
    / 255 for uint8 inputs, the value itself for float inputs."""
    mean, std = stats
    x = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
        x = x / 255.0
    return (x - jnp.asarray(mean)) / jnp.asarray(std)


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


def init_member(model: nn.Module, tx: optax.GradientTransformation, key: PRNGKey,
                input_shape: tuple = (32, 32, 3)) -> MemberState:
    """A freshly initialised member: parameters, batch statistics (empty for a model without
    them), optimiser state, step 0; ``input_shape``: one example's shape."""
    k_params, k_member = jax.random.split(key)
    variables = model.init(k_params, jnp.zeros((1,) + tuple(input_shape), jnp.float32),
                           train=False)
    params = variables["params"]
    return MemberState(params=params, batch_stats=variables.get("batch_stats", {}),
                       opt_state=tx.init(params), step=jnp.zeros((), jnp.int32), key=k_member)


def apply_model(model: nn.Module, params: Params, batch_stats: Any, x: jax.Array,
                train: bool, weight: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """``model`` on ``x`` as its variables and signature allow (`jaxunlearn.models.
    register_model`): ``weight`` is passed when its ``__call__`` takes it; in training its
    ``batch_stats``, if it has any, are updated. Returns the logits and the batch statistics
    after the call."""
    kwargs = {"weight": weight} if weight is not None and takes_weight(model) else {}
    if not jax.tree.leaves(batch_stats):  # a model without batch statistics
        return model.apply({"params": params}, x, train=train, **kwargs), batch_stats
    variables = {"params": params, "batch_stats": batch_stats}
    if not train:
        return model.apply(variables, x, train=False, **kwargs), batch_stats
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"], **kwargs)
    return logits, updates["batch_stats"]


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
    """Per-example cross-entropy ``[b]`` (natural log), against labels smoothed by
    ``smoothing`` (the true label keeps ``1 - smoothing`` plus its share of the rest; a traced
    scalar, one member's own, takes the smoothed path whatever its value)."""
    if isinstance(smoothing, (int, float)) and not smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    classes = logits.shape[-1]
    target = optax.smooth_labels(jax.nn.one_hot(labels, classes), smoothing)
    return optax.softmax_cross_entropy(logits, target)


def distill_kl(student: jax.Array, teacher: jax.Array, temperature: float) -> jax.Array:
    """Per-example ``KL(softmax(teacher / T) || softmax(student / T)) * T**2`` ``[b]`` (Hinton
    et al.'s scaling keeps its gradient's size independent of ``T``): distillation, as SCRUB's
    `StepHook` adds it."""
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


class StepHook(NamedTuple):
    """A strategy's addition to the member step (`train_step`): the one way a strategy changes
    what a training step computes, with per-member auxiliary arrays ``aux`` (any pytree of
    arrays; in an ensemble every leaf has the member axis first and each member gets its own
    row, as with its state). Both functions are traced into the compiled step, which is built
    once per hook: define the hook once (module level), from module-level functions.

    * ``loss(aux, logits, labels, idx, weight, loss) -> loss``: the per-example loss ``[b]``
      from the batch's logits ``[b, classes]``, labels ``[b]``, example ids ``idx`` ``[b]``
      (rows of the resident training set: index ``aux`` by them), weights ``[b]`` (negative:
      ascended) and the per-example cross-entropy ``loss`` ``[b]``. The step minimises the
      weighted mean as before. SCRUB: a teacher's logits, distilled.
    * ``updates(aux, updates) -> updates``: the optimiser's updates (params-like), before the
      learning-rate scale multiplies them. SalUn: a 0/1 mask of the parameters that may change.

    None leaves that part as it is.
    """

    loss: Callable | None = None
    updates: Callable | None = None


def train_step(model: nn.Module, tx: optax.GradientTransformation, use_augment: bool,
               state: MemberState, images: jax.Array, labels: jax.Array, idx: jax.Array,
               weight: jax.Array, active: jax.Array, lr_scale: jax.Array | None = None,
               label_smoothing: float = 0.0, hook: StepHook | None = None,
               aux: Any = None,
               stats: Stats = CIFAR10_STATS) -> tuple[MemberState, jax.Array]:
    """One optimiser step of one member on the examples ``images[idx]``.

    Args:
      state: the member's state.
      images, labels: the resident training set, ``[n, *input_shape]`` (uint8 or float32)
        and int ``[n]``.
      idx: int32 ``[b]`` example ids of this batch (padding entries may hold any valid id).
      weight: float32 ``[b]``, 1 for real examples and 0 for padding; a negative weight makes
        the step ascend that example's loss (BatchNorm and the mean use its absolute value).
      active: bool scalar; an inactive member (or an all-padding batch) is returned unchanged.
      lr_scale: float scalar multiplying the update (a learning-rate schedule); None: 1.
      label_smoothing: smoothing of the training labels (static, or the member's own traced
        scalar).
      hook: a strategy's `StepHook` (static), given this member's ``aux``; None: plain
        cross-entropy and the optimiser's updates.
      stats: the input normalisation ``(mean, std)`` (`normalize`; static).

    Returns:
      The new state and the batch's weighted loss sum (so epoch means are exact).
    """
    with jax.named_scope("input"):  # scopes name the step's parts in profiles
        x = images[idx]
        if use_augment:
            x = augment(jax.random.fold_in(state.key, state.step), x)
        x = normalize(x, stats)
        y = labels[idx]

    mass = jnp.abs(weight)  # a negative weight ascends that example's loss (NegGrad+)

    def loss_fn(params):
        logits, batch_stats = apply_model(model, params, state.batch_stats, x, True, mass)
        with jax.named_scope("loss"):
            loss = cross_entropy(logits, y, label_smoothing)
            if hook is not None and hook.loss is not None:
                loss = hook.loss(aux, logits, y, idx, weight, loss)
            total = jnp.sum(loss * weight)
            return total / jnp.maximum(jnp.sum(mass), 1.0), (batch_stats, total)

    grads, (batch_stats, total) = jax.grad(loss_fn, has_aux=True)(state.params)
    with jax.named_scope("optimizer"):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        if hook is not None and hook.updates is not None:
            updates = hook.updates(aux, updates)
        if lr_scale is not None:
            updates = jax.tree.map(lambda u: u * lr_scale.astype(u.dtype), updates)
        new = MemberState(params=optax.apply_updates(state.params, updates),
                          batch_stats=batch_stats, opt_state=opt_state, step=state.step + 1,
                          key=state.key)
        take = jnp.logical_and(active, jnp.sum(mass) > 0)
        new = jax.tree.map(lambda n, o: jnp.where(take, n, o), new, state)
    return new, jnp.where(take, total, 0.0)


def loss_grads(model: nn.Module, state: MemberState, images: jax.Array, labels: jax.Array,
               idx: jax.Array, weight: jax.Array, stats: Stats = CIFAR10_STATS) -> Params:
    """The gradient of one member's weighted cross-entropy sum on ``images[idx]`` (no label
    smoothing, no augmentation; BatchNorm in training mode, its statistics left as they are)
    with respect to its parameters: SalUn's saliency."""
    x, y = normalize(images[idx], stats), labels[idx]

    def loss_fn(params):
        logits, _ = apply_model(model, params, state.batch_stats, x, True, weight)
        return jnp.sum(cross_entropy(logits, y) * weight)

    return jax.grad(loss_fn)(state.params)


def eval_logits(model: nn.Module, state: MemberState, images: jax.Array,
                idx: jax.Array, flip: bool = False, stats: Stats = CIFAR10_STATS) -> jax.Array:
    """Logits ``[b, classes]`` of one member (BatchNorm in inference mode) on ``images[idx]``;
    with ``flip``, the mean of the logits of each image and of its mirror image (test-time
    augmentation, images only); ``stats``: the input normalisation."""
    x = normalize(images[idx], stats)
    logits = apply_model(model, state.params, state.batch_stats, x, False)[0]
    if flip:
        mirror = apply_model(model, state.params, state.batch_stats, x[:, :, ::-1, :], False)[0]
        logits = 0.5 * (logits + mirror)
    return logits
