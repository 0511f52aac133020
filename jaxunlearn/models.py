"""ResNets (torchvision layout) and small fast CIFAR nets in Flax Linen, with an example-weighted
BatchNorm; the registry of models by name (`MODELS`, `register_model`: the contract a model of
your own keeps).

Every built-in model maps normalised float images ``[b, H, W, C]`` (CIFAR-10's ``[b, 32, 32,
3]``) to logits ``[b, classes]`` and takes an optional ``weight: float[b]``: examples with
weight 0 are padding. BatchNorm in training
mode computes its statistics over the weighted examples only, so a padded last batch trains
exactly like a smaller batch while every step keeps one static shape (no recompilation when a
sample size changes).

Stems:
  ``imagenet``: 7x7 stride-2 convolution + 3x3 stride-2 max-pool (torchvision, and the original
  study, on 32x32 inputs).
  ``cifar``: 3x3 stride-1 convolution, no pool (the usual CIFAR ResNet).

With 10 classes and the ImageNet stem, ResNet-18 has 11,181,642 parameters and ResNet-152
58,164,298, as in torchvision (BatchNorm scale and bias counted, running statistics not).

The ``air`` family (`AirNet`) is a plain convolutional net in the style of airbench, made for
32x32 images on little compute: a 3x3 convolution, then groups of (3x3 convolution, 2x2
max-pool, BatchNorm, GELU, 3x3 convolution, BatchNorm, GELU), a global max-pool and a
bias-free linear classifier whose logits are scaled down. ``air-s`` (widths 16/32/64/64,
144,592 parameters, 0.032 GFLOP per image forward) trains on a 2-core CPU at a few hundred images per second; ``air-m``
doubles and ``air-l`` quadruples the widths. They have no stem setting.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxunlearn.config import choices

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu") for convolutions.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
STEMS = choices("stem")  # as the setting declares them


class BatchNorm(nn.Module):
    """BatchNorm over all but the channel axis, with optional per-example weights.

    Running statistics follow PyTorch: ``running = momentum * running + (1 - momentum) * batch``
    with the unbiased batch variance. In training the normalisation is `batch_norm_train`
    (its gradient written by hand: two reductions per channel instead of autodiff's four).
    """

    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, train: bool, weight=None):
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        if train:
            w = (jnp.ones(x.shape[:1], jnp.float32) if weight is None
                 else weight.astype(jnp.float32))
            y, mean, var, count = batch_norm_train(x, w, scale, bias, self.epsilon)
            if not self.is_initializing():
                mean, var, count = jax.lax.stop_gradient((mean, var, count))
                unbiased = var * count / jnp.maximum(count - 1.0, 1.0)
                m = self.momentum
                running_mean.value = m * running_mean.value + (1 - m) * mean
                running_var.value = m * running_var.value + (1 - m) * unbiased
            return y
        mean, var = running_mean.value, running_var.value
        inv = jax.lax.rsqrt(var + self.epsilon) * scale
        return (x - mean.astype(x.dtype)) * inv.astype(x.dtype) + bias.astype(x.dtype)


def _bn_stats(x, w):
    """Weighted per-channel mean and (biased) variance of ``x [b, ..., c]`` over all but the
    channel axis, in float32; the weighted count of positions and its floor at 1 (the
    divisor)."""
    axes = tuple(range(x.ndim - 1))
    wb = w.reshape(x.shape[:1] + (1,) * (x.ndim - 1))
    xf = x.astype(jnp.float32)
    count = jnp.sum(w) * math.prod(x.shape[1:-1])
    n = jnp.maximum(count, 1.0)
    mean = jnp.sum(xf * wb, axis=axes) / n
    var = jnp.sum(jnp.square(xf - mean) * wb, axis=axes) / n
    return mean, var, count, n


def _bn_fwd(x, w, scale, bias, epsilon):
    mean, var, count, n = _bn_stats(x, w)
    rstd = jax.lax.rsqrt(var + epsilon)
    inv = rstd * scale
    y = (x - mean.astype(x.dtype)) * inv.astype(x.dtype) + bias.astype(x.dtype)
    return (y, mean, var, count), (x, w, mean, rstd, scale, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def batch_norm_train(x, w, scale, bias, epsilon):
    """Training-mode BatchNorm: ``(x - mean) / sqrt(var + epsilon) * scale + bias`` with the
    weighted batch statistics of ``x [b, ..., c]`` (example weights ``w [b] >= 0``; weight 0
    is padding). Returns ``(y, mean, var, count)``; only ``y`` carries a gradient (the
    statistics feed the running averages, which are not differentiated), and ``w`` gets none.
    """
    return _bn_fwd(x, w, scale, bias, epsilon)[0]


def _bn_bwd(epsilon, res, cotangents):
    # With xhat = (x - mean) * rstd and the weighted statistics' dependence on x,
    # dx_i = rstd * scale * (dy_i - w_i / n * (sum(dy) + xhat_i * sum(dy * xhat))), the sums over
    # every position of the channel (the mean is subtracted from padding too); they are also
    # dbias and dscale.
    x, w, mean, rstd, scale, n = res
    dy = cotangents[0].astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    wb = w.reshape(x.shape[:1] + (1,) * (x.ndim - 1))
    xhat = (x.astype(jnp.float32) - mean) * rstd
    dbias = jnp.sum(dy, axis=axes)
    dscale = jnp.sum(dy * xhat, axis=axes)
    dx = (rstd * scale) * (dy - (wb / n) * (dbias + xhat * dscale))
    return dx.astype(x.dtype), jnp.zeros_like(w), dscale, dbias


batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


def max_pool_2x2(x):
    """2x2 max-pool with stride 2 over ``[b, h, w, c]``, as a reshape and a max.

    Same values as ``nn.max_pool(x, (2, 2), strides=(2, 2))`` (an odd last row or column is
    dropped, as there); its gradient is an element-wise select (split evenly between tied
    maxima) instead of select-and-scatter, which XLA:CPU lowers to a slow scatter.
    """
    b, h, w, c = x.shape
    x = x[:, :h - h % 2, :w - w % 2]
    return jnp.max(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def _pad(k: int):
    return ((k // 2, k // 2), (k // 2, k // 2))


class _ResidualBlock(nn.Module):
    """What both residual blocks share: bias-free convolutions in the compute dtype, and the
    shortcut (a strided 1x1 convolution + BatchNorm where the shape changes)."""

    filters: int
    strides: int = 1
    dtype: Any = jnp.float32

    def conv(self, features: int, kernel: int, strides: int = 1, name: str | None = None):
        padding = _pad(kernel) if kernel > 1 else "VALID"
        return nn.Conv(features, (kernel, kernel), strides, padding=padding, use_bias=False,
                       kernel_init=conv_init, dtype=self.dtype, name=name)

    def residual(self, x, y, train: bool, weight):
        if x.shape != y.shape:
            x = self.conv(y.shape[-1], 1, self.strides, name="downsample_conv")(x)
            x = BatchNorm(name="downsample_bn")(x, train, weight)
        return nn.relu(x + y)


class BasicBlock(_ResidualBlock):
    """Two 3x3 convolutions (ResNet-18/34)."""

    @nn.compact
    def __call__(self, x, train: bool, weight=None):
        y = self.conv(self.filters, 3, self.strides)(x)
        y = nn.relu(BatchNorm()(y, train, weight))
        y = self.conv(self.filters, 3)(y)
        return self.residual(x, BatchNorm()(y, train, weight), train, weight)


class Bottleneck(_ResidualBlock):
    """1x1, 3x3 (strided, as torchvision v1.5), 1x1 x4 (ResNet-50/101/152)."""

    @nn.compact
    def __call__(self, x, train: bool, weight=None):
        y = self.conv(self.filters, 1)(x)
        y = nn.relu(BatchNorm()(y, train, weight))
        y = self.conv(self.filters, 3, self.strides)(y)
        y = nn.relu(BatchNorm()(y, train, weight))
        y = self.conv(self.filters * 4, 1)(y)
        return self.residual(x, BatchNorm()(y, train, weight), train, weight)


class ResNet(nn.Module):
    """A ResNet: stem, stages of residual blocks, global average pool, linear classifier.

    Attributes:
      stage_sizes: blocks per stage (ResNet-18: (2, 2, 2, 2)).
      block_cls: `BasicBlock` or `Bottleneck`.
      num_classes: output logits.
      width: channels of the first stage (doubles each stage).
      stem: "imagenet" or "cifar".
      dtype: compute dtype of convolutions and the classifier (parameters, BatchNorm
        statistics and logits stay float32).
    """

    stage_sizes: Sequence[int]
    block_cls: Any
    num_classes: int = 10
    width: int = 64
    stem: str = "imagenet"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, weight=None):
        if self.stem not in STEMS:
            raise ValueError(f"unknown stem {self.stem!r}; choose one of {STEMS}")
        x = x.astype(self.dtype)
        if self.stem == "imagenet":
            x = nn.Conv(self.width, (7, 7), 2, padding=_pad(7), use_bias=False,
                        kernel_init=conv_init, dtype=self.dtype, name="stem_conv")(x)
            x = nn.relu(BatchNorm(name="stem_bn")(x, train, weight))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = nn.Conv(self.width, (3, 3), 1, padding=_pad(3), use_bias=False,
                        kernel_init=conv_init, dtype=self.dtype, name="stem_conv")(x)
            x = nn.relu(BatchNorm(name="stem_bn")(x, train, weight))
        for stage, blocks in enumerate(self.stage_sizes):
            for b in range(blocks):
                strides = 2 if stage > 0 and b == 0 else 1
                x = self.block_cls(self.width * 2**stage, strides, self.dtype)(x, train, weight)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x).astype(jnp.float32)


class AirNet(nn.Module):
    """A plain airbench-style CIFAR net (see the module docstring).

    Attributes:
      widths: channels of the first convolution, then of each group.
      num_classes: output logits.
      logit_scale: multiplies the logits (a small scale keeps the first steps of a high
        learning rate stable).
      dtype: compute dtype (parameters, BatchNorm statistics and logits stay float32).
    """

    widths: Sequence[int]
    num_classes: int = 10
    logit_scale: float = 1 / 9
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, weight=None):
        def conv(features, name=None):
            return nn.Conv(features, (3, 3), padding=_pad(3), use_bias=False,
                           kernel_init=conv_init, dtype=self.dtype, name=name)

        x = x.astype(self.dtype)
        x = nn.gelu(BatchNorm(name="stem_bn")(conv(self.widths[0], "stem_conv")(x), train,
                                              weight))
        for features in self.widths[1:]:
            x = max_pool_2x2(conv(features)(x))
            x = nn.gelu(BatchNorm()(x, train, weight))
            x = nn.gelu(BatchNorm()(conv(features)(x), train, weight))
        x = jnp.max(x, axis=(1, 2))
        logits = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype, name="fc")(x)
        return logits.astype(jnp.float32) * self.logit_scale


PRECISIONS = {"fp32": jnp.float32, "bf16": jnp.bfloat16}

RESNETS = {
    "resnet18": dict(stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock),
    "resnet34": dict(stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock),
    "resnet50": dict(stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck),
    "resnet101": dict(stage_sizes=(3, 4, 23, 3), block_cls=Bottleneck),
    "resnet152": dict(stage_sizes=(3, 8, 36, 3), block_cls=Bottleneck),
    # A two-stage, 8-channel ResNet: compiles in seconds on a CPU, for tests and smoke runs.
    "tiny": dict(stage_sizes=(1, 1), block_cls=BasicBlock, width=8),
}
AIRNETS = {
    "air-s": dict(widths=(16, 32, 64, 64)),
    "air-m": dict(widths=(32, 64, 128, 128)),
    "air-l": dict(widths=(64, 128, 256, 256)),
}
ARCHITECTURES = {**RESNETS, **AIRNETS}


ModelFactory = Callable[..., nn.Module]


def register_model(name: str, factory: ModelFactory) -> ModelFactory:
    """Makes ``factory`` the model called ``name``: usable wherever a built-in model is (the
    ``model`` and ``baseline`` settings, the command line, resume, forget, audit). A run using
    it records the factory's module, and every command that reopens the run imports it again
    (`jaxunlearn.plugins`; one defined in a script or notebook must be registered again in
    another process). Returns ``factory`` (so it can decorate it). A name taken by another
    factory is refused (ValueError).

    The contract:

    * ``factory(num_classes=K, stem=S, dtype=D)`` returns a Flax Linen module; it is called
      with these keyword arguments only (take ``**kwargs`` for those you do not use): ``K``
      the dataset's classes, ``S`` the ``stem`` setting, ``D`` the compute dtype of the
      ``precision`` setting (``jnp.float32``, or ``jnp.bfloat16``: keep parameters and logits
      float32). Equal arguments must give equal modules (same structure, same initialisation
      for a key).
    * ``module(x, train=bool)`` maps a batch ``x`` float32 ``[b, *input_shape]`` (the
      dataset's example shape: ``[b, H, W, C]`` images or ``[b, d]`` feature vectors,
      already normalised by the dataset's mean and std) to float32 logits ``[b, K]``;
      ``train`` is True in training steps and False when scoring. It must be deterministic
      given its variables (no dropout RNG is passed).
    * Variables: ``params``, and optionally ``batch_stats`` (running statistics, updated in
      training through ``mutable=["batch_stats"]``, used when ``train`` is False); no other
      collection. A model without ``batch_stats`` is fine.
    * Optionally a ``weight`` argument: ``module(x, train=bool, weight=w)`` with ``w`` float32
      ``[b]``: 0 marks a padding example of a static-shaped last batch, positive a real one;
      it is passed in training when the module's ``__call__`` takes ``weight``. `BatchNorm`
      here computes its statistics over the weighted examples only, so padding never counts.
      A model without ``weight`` (a standard ``flax.linen.BatchNorm``, say) also trains:
      padded examples then count in its batch statistics (their loss never does).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a model name is a non-empty string, got {name!r}")
    if not callable(factory):
        raise ValueError(f"register_model({name!r}, factory): factory must be callable "
                         f"(factory(num_classes=..., stem=..., dtype=...) -> module), got "
                         f"{type(factory).__name__}")
    if MODELS.get(name, factory) is not factory:
        raise ValueError(f"model name {name!r} is taken by {MODELS[name]!r}; choose another name")
    MODELS[name] = factory
    # The module that registered it: what another process imports to have it again
    # (`jaxunlearn.plugins`), also when the factory is a partial of someone else's function.
    ORIGINS[name] = sys._getframe(1).f_globals.get("__name__", "")
    return factory


def _builtin(name: str, num_classes: int = 10, stem: str = "imagenet",
             dtype: Any = jnp.float32) -> nn.Module:
    if name in AIRNETS:
        return AirNet(num_classes=num_classes, dtype=dtype, **AIRNETS[name])
    return ResNet(num_classes=num_classes, stem=stem, dtype=dtype, **RESNETS[name])


# Every model by name (`register_model`): the built-in ones (`ARCHITECTURES`), then yours.
ORIGINS: dict[str, str] = {}  # name -> the module that called `register_model` for it
MODELS: dict[str, ModelFactory] = {name: functools.partial(_builtin, name)
                                   for name in ARCHITECTURES}


def make_model(name: str, stem: str = "imagenet", num_classes: int = 10,
               dtype: Any = jnp.float32) -> nn.Module:
    """Builds a model by name (`MODELS`): resnet18/34/50/101/152, tiny, air-s/m/l (no stem),
    or a registered one."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}, or register "
                         f"yours (jaxunlearn.models.register_model)")
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; choose one of {STEMS}")
    return MODELS[name](num_classes=num_classes, stem=stem, dtype=dtype)


def takes_weight(model: nn.Module) -> bool:
    """Whether ``model``'s ``__call__`` takes a ``weight`` argument (or any keyword)."""
    try:
        params = inspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):
        return False
    return "weight" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def check_model(name: str, input_shape: tuple, classes: int, stem: str = "imagenet",
                dtype: Any = jnp.float32) -> None:
    """Traces model ``name`` (shapes only, nothing computed) on one input of ``input_shape``
    and checks it keeps the contract of `register_model`: variables ``params`` (and
    ``batch_stats``) only, logits ``[1, classes]``. ValueError saying what is wrong."""
    model = make_model(name, stem, classes, dtype)
    x = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
    try:
        variables = jax.eval_shape(lambda k: model.init(k, x, train=False),
                                   jax.random.PRNGKey(0))
        logits = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    except Exception as e:  # whatever the module raises on this input
        raise ValueError(f"model {name!r} fails on inputs of shape {list(input_shape)} (the "
                         f"data's; {type(e).__name__}: {e}); use a model made for this data "
                         f"(see jaxunlearn.models.register_model)") from e
    other = sorted(set(variables) - {"params", "batch_stats"})
    if other:
        raise ValueError(f"model {name!r} has variable collections {other}; a model may hold "
                         f"params and batch_stats only (see jaxunlearn.models.register_model)")
    if getattr(logits, "shape", None) != (1, classes):
        raise ValueError(f"model {name!r} returns {getattr(logits, 'shape', type(logits))} "
                         f"for one example, expected logits [1, {classes}] (the data has "
                         f"{classes} classes): its factory must use num_classes")


def count_params(params) -> int:
    """Number of scalars in a parameter pytree (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(params))
