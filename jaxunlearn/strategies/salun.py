"""``salun`` (SalUn, Fan et al., ICLR 2024: "Saliency unlearning"): random-label unlearning
restricted to the weights that matter for the forget set.

For each invalid member, the gradient of its cross-entropy on the forgotten ids it held marks
each weight's saliency; the weights above the ``salun_sparsity`` quantile of |gradient| (the
paper's default: the top half) form the member's mask. The member then trains as
``random_labels`` does (its retained sample and its forgotten ids, each with a random wrong
label, ``unlearn_epochs`` at ``unlearn_lr`` times the learning rate), but only the masked
weights change: the optimiser's update is multiplied by the mask (`HOOK`, the mask as each
member's auxiliary arrays), and with an element-wise optimiser that is the paper's masked
gradient. BatchNorm's running statistics follow the data
as in any training. Approximate, like the other methods of `approximate`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxunlearn.config import setting
from jaxunlearn.steps import StepHook
from jaxunlearn.strategies.approximate import RandomLabels


@functools.partial(jax.jit, static_argnums=1)
def saliency_mask(grads, sparsity: float):
    """1 where a weight's |gradient| is at or above its member's ``sparsity`` quantile over all
    its weights, else 0: a stacked params-like pytree ``[m, ...]`` of float32."""
    leaves = jax.tree.leaves(grads)
    flat = jnp.concatenate([jnp.abs(x).reshape(x.shape[0], -1) for x in leaves], axis=1)
    threshold = jnp.quantile(flat, sparsity, axis=1)
    return jax.tree.map(
        lambda g: (jnp.abs(g) >= threshold.reshape((-1,) + (1,) * (g.ndim - 1))).astype(
            jnp.float32), grads)


def masked(mask, updates):
    """The optimiser's ``updates`` where ``mask`` (params-like, 0/1) is 1, else 0."""
    return jax.tree.map(lambda u, r: u * r.astype(u.dtype), updates, mask)


HOOK = StepHook(updates=masked)  # the member step's updates, masked by the member's aux


class SalUn(RandomLabels):
    name = "salun"
    order = 13
    settings = {"salun_sparsity": setting(0.5, "SalUn: the quantile of |forget gradient| below "
                                               "which weights stay", at_least=0, below=1,
                                          unlearning=True, compare=True)}

    def recipe(self, ctx, rounds, retain, held, forget):
        grads = ctx.group.gradients(held, ctx.cfg.batch_size)
        mask = saliency_mask(grads, float(ctx.cfg.salun_sparsity))
        return super().recipe(ctx, rounds, retain, held, forget)._replace(hook=HOOK, aux=mask)
