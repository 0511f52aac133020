"""A model group: the ensemble, or the baseline as a group of one, on the device.

`compile_group` builds the jitted functions once per process and setting; `ModelGroup` holds a
group's stacked state and its lineage, and runs its jitted steps (`jaxunlearn.trainer` drives
them).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from typing import Any, Callable, NamedTuple

import flax.serialization

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh, NamedSharding

from jaxunlearn import ensemble, reinit, sharding, xla_options
from jaxunlearn.config import PER_MEMBER, Config, member_values, varying
from jaxunlearn.data import CIFAR10_CLASSES, Dataset
from jaxunlearn.lineage import Lineage
from jaxunlearn.models import MODELS, PRECISIONS, make_model
from jaxunlearn.steps import CIFAR10_STATS, make_optimizer


class Compiled(NamedTuple):
    """A model, its optimiser and their jitted ensemble functions (state buffers donated)."""

    model: Any
    tx: Any
    layout: str  # the member-parallel layout (`jaxunlearn.ensemble.resolve_layout`)
    mesh: Mesh | None
    init: Callable
    step: Callable
    logits: Callable
    unlearn: Callable
    reset_optimizer: Callable
    rebase: Callable  # (state, base, mask) -> the masked members started from base
    gather: Callable  # (state, sel int [k]) -> the members sel as a stack of k
    scatter: Callable  # (state, sub, sel) -> state with sub's rows written at sel
    grads: Callable  # (state, images, labels, idx, weight) -> each member's loss gradient


def _gather(state, sel):
    return jax.tree.map(lambda x: x[sel], state)


def _scatter(state, sub, sel):
    return jax.tree.map(lambda x, y: x.at[sel].set(y), state, sub)


def setup_compiler_options() -> dict | None:
    """XLA options for the one-off ensemble init: on CPU, LLVM's backend optimisations take
    far longer compiling the vmapped init (thousands of unrolled random-number ops) than the
    function, which runs once, could save; level 0 compiles it quickly. `unlearn` keeps the full
    optimisation: it runs at every deletion, and unoptimised it is several times slower
    (benchmarks/README.md, "Why the code is as it is")."""
    return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


def compile_group(arch: str, stem: str, precision: str, optimizer: str,
                  learning_rate: float | tuple, weight_decay: float | tuple,
                  member_parallel: str, augment: bool, devices: int = 1, members: int = 5,
                  momentum: float | tuple = 0.9, label_smoothing: float | tuple = 0.0,
                  tta: bool = False, input_shape: tuple = (32, 32, 3), classes: int = 10,
                  stats: tuple = CIFAR10_STATS) -> Compiled:
    """Builds (once per process and setting) the jitted functions of one model group, so that
    repeated runs in one process, as in sweeps and tests, reuse their compilations. Each
    compiles once per stack size it is called with.

    ``devices`` other than 1 shards the member axis over that many devices (0: all) with
    `jax.shard_map`, the single-device ``member_parallel`` layout running inside; ``members``
    only informs ``auto``. ``tta``: logits averaged with the mirror images'. The data's
    ``input_shape`` (one example's), ``classes`` and ``stats`` (the input normalisation
    ``(mean, std)``, `jaxunlearn.data.Dataset.stats`) default to CIFAR-10's.

    ``learning_rate``, ``weight_decay``, ``momentum`` and ``label_smoothing`` may be tuples of
    one value per member: where the values differ, the step takes them as ``hyper`` arrays
    (`ModelGroup.member_hyper`) instead of compiling them in, so every sweep of them shares
    one compilation; ``tx`` then only initialises the optimiser state.
    """
    # One cache entry per setting, however the arguments were passed.
    stats = tuple(tuple(float(v) for v in part) for part in stats)
    return _compile_group(arch, stem, precision, optimizer, _setting_key(learning_rate),
                          _setting_key(weight_decay), member_parallel, bool(augment),
                          int(devices), int(members), _setting_key(momentum),
                          _setting_key(label_smoothing), bool(tta),
                          tuple(int(d) for d in input_shape), int(classes), stats,
                          MODELS.get(arch))


# The cache key of a setting whose values differ between members (they are traced, not
# compiled in).
_PER_MEMBER = "per-member"


def _setting_key(value):
    if isinstance(value, (tuple, list)):
        if len(set(value)) > 1:
            return _PER_MEMBER
        value = value[0]
    return float(value)


def group_functions(cfg: Config, arch: str, members: int, devices: int = 1,
                    input_shape: tuple = (32, 32, 3), classes: int = 10,
                    stats: tuple = CIFAR10_STATS) -> Compiled:
    """The compiled functions a `ModelGroup` of ``members`` ``arch`` models uses under ``cfg``
    on data of ``input_shape``, ``classes`` and ``stats`` (`compile_group`)."""
    # A group of one (the baseline) needs no member parallelism: `unroll` runs it as the plain
    # model. (vmap over an axis of one batches the kernels too, and XLA:CPU runs the grouped
    # convolutions that makes at about half the speed of plain ones.)
    parallel = cfg.member_parallel if members > 1 else "unroll"
    each = {name: member_values(cfg, name, members) for name in PER_MEMBER}
    each = {name: v if len(set(v)) > 1 else v[0] for name, v in each.items()}
    return compile_group(arch, cfg.stem, cfg.precision, cfg.optimizer, each["learning_rate"],
                         each["weight_decay"], parallel, cfg.augment, devices, members,
                         each["momentum"], each["label_smoothing"], cfg.tta, input_shape,
                         classes, stats)


@functools.lru_cache(maxsize=64)
def _compile_group(arch, stem, precision, optimizer, learning_rate, weight_decay,
                   member_parallel, augment, devices, members, momentum, label_smoothing,
                   tta, input_shape, classes, stats, factory) -> Compiled:
    del factory  # (a key only: a model name registered again compiles again)
    model = make_model(arch, stem, classes, dtype=PRECISIONS[precision])
    settings = dict(learning_rate=learning_rate, weight_decay=weight_decay, momentum=momentum)
    traced = _PER_MEMBER in (*settings.values(), label_smoothing)
    # A setting given per member enters the step traced (`ensemble.make_train_step`); the
    # optimiser the state is initialised with takes a stand-in for it: only the state's
    # structure counts (weight decay in the chain: some member has it).
    settings = {k: 1.0 if v == _PER_MEMBER else v for k, v in settings.items()}
    tx = make_optimizer(optimizer, **settings)
    layout = ensemble.resolve_layout(member_parallel, arch=arch, stem=stem, members=members)
    make_tx = functools.partial(make_optimizer, optimizer, **settings) if traced else None
    step = ensemble.make_train_step(model, tx, layout, augment,
                                    0.0 if label_smoothing == _PER_MEMBER else label_smoothing,
                                    stats, make_tx)
    logits = ensemble.make_eval_logits(model, layout, tta, stats)
    reset = functools.partial(ensemble.reset_optimizer, tx)
    rebase = functools.partial(ensemble.rebase, tx)
    init = functools.partial(ensemble.init_ensemble, model, tx, input_shape=input_shape)
    mesh = sharding.member_mesh(devices) if devices != 1 else None
    setup = setup_compiler_options()
    fast = xla_options.step_compiler_options()  # the convolution steps (training, scoring)
    grads = jax.jit(ensemble.make_loss_grads(model, layout, stats), compiler_options=fast)
    if mesh is None or mesh.size == 1:
        return Compiled(
            model=model, tx=tx, layout=layout, mesh=None,
            init=jax.jit(init, static_argnums=1, compiler_options=setup),
            step=jax.jit(step, donate_argnums=0, static_argnames="hook",
                         compiler_options=fast),
            logits=jax.jit(logits, compiler_options=fast),
            unlearn=jax.jit(reinit.make_reinit(model, tx, input_shape=input_shape),
                            donate_argnums=1),
            reset_optimizer=jax.jit(reset, donate_argnums=0),
            rebase=jax.jit(rebase, donate_argnums=0),
            gather=jax.jit(_gather), scatter=jax.jit(_scatter, donate_argnums=0), grads=grads)
    M, R = sharding.MEMBERS, sharding.REPLICATED
    return Compiled(
        model=model, tx=tx, layout=layout, mesh=mesh,
        init=jax.jit(init, static_argnums=1, out_shardings=NamedSharding(mesh, M),
                     compiler_options=setup),
        step=_sharded_step(step, mesh, fast, traced),
        logits=jax.jit(sharding.shard(logits, mesh, (M, R, R), M), compiler_options=fast),
        unlearn=jax.jit(reinit.make_reinit(model, tx, mesh, input_shape), donate_argnums=1),
        reset_optimizer=jax.jit(sharding.shard(reset, mesh, (M, M), M), donate_argnums=0),
        rebase=jax.jit(sharding.shard(rebase, mesh, (M, R, M), M), donate_argnums=0),
        gather=jax.jit(_gather, out_shardings=NamedSharding(mesh, M)),
        scatter=jax.jit(_scatter, out_shardings=NamedSharding(mesh, M), donate_argnums=0),
        grads=grads)


def _sharded_step(step: Callable, mesh: Mesh, options, per_member: bool) -> Callable:
    """The step sharded over the member mesh, jitted once per `jaxunlearn.steps.StepHook`
    (and whether it takes auxiliary arrays, sharded like the members); with ``per_member``
    settings it takes their arrays (``hyper``, sharded like the members) too. Every argument
    enters as an array: no learning-rate scale means 1."""
    M, R = sharding.MEMBERS, sharding.REPLICATED

    @functools.lru_cache(maxsize=None)
    def compiled(hook, with_aux: bool):
        specs = (M, R, R, M, M, M, M) + ((M,) if with_aux else ()) + ((M,) if per_member else ())

        def fn(state, images, labels, idx, weight, active, lr_scale, *rest):
            aux = rest[0] if with_aux else None
            hyper = rest[-1] if per_member else None
            return step(state, images, labels, idx, weight, active, lr_scale, aux, hyper,
                        hook=hook)

        return jax.jit(sharding.shard(fn, mesh, specs, (M, M)), donate_argnums=0,
                       compiler_options=options)

    def call(state, images, labels, idx, weight, active, lr_scale=None, aux=None, hyper=None,
             *, hook=None):
        if lr_scale is None:
            lr_scale = jnp.ones(active.shape, jnp.float32)
        if per_member != (hyper is not None):
            raise ValueError("a group with per-member settings steps with their arrays "
                             "(hyper=ModelGroup.member_hyper(...)), and only such a group")
        args = ((state, images, labels, idx, weight, active, lr_scale)
                + (() if aux is None else (aux,)) + (() if hyper is None else (hyper,)))
        return compiled(hook, aux is not None)(*args)

    return call


class Resident(NamedTuple):
    """A dataset on the devices: the training then the test images in one array (test ids
    follow the training ids, so one compiled logits function scores both) and their labels,
    also kept on the host, with the data's classes and input normalisation. Groups on the
    same devices share one."""

    n_train: int
    n_test: int
    images: Any  # device [n_train + n_test, ...], replicated
    labels: Any  # device int [n_train + n_test], replicated
    host_labels: np.ndarray
    classes: int = CIFAR10_CLASSES
    stats: tuple = CIFAR10_STATS  # (mean, std) per last axis

    @classmethod
    def put(cls, data, place: Callable) -> "Resident":
        """From a host `jaxunlearn.data.Dataset`, or the arrays (train images, train labels,
        test images, test labels) of CIFAR-10, put on the devices by ``place(x, spec)``."""
        if isinstance(data, Dataset):
            arrays, classes, stats = ((data.train_images, data.train_labels, data.test_images,
                                       data.test_labels), data.classes, data.stats)
        else:
            arrays, classes, stats = tuple(data), CIFAR10_CLASSES, CIFAR10_STATS
            if arrays[0].dtype != np.uint8 or arrays[0].shape[1:] != (32, 32, 3):
                raise ValueError(f"arrays of images {arrays[0].dtype} {arrays[0].shape} are not "
                                 f"CIFAR-10's; pass a jaxunlearn.data.Dataset "
                                 f"(data.from_arrays(...)), which carries its classes and "
                                 f"normalisation")
        train_images, train_labels, test_images, test_labels = arrays
        labels = np.concatenate([train_labels, test_labels])
        return cls(len(train_images), len(test_images),
                   place(np.concatenate([train_images, test_images]), sharding.REPLICATED),
                   place(labels, sharding.REPLICATED), labels, classes, stats)

    @property
    def input_shape(self) -> tuple:
        """One example's shape."""
        return tuple(self.images.shape[1:])

    @property
    def test_ids(self) -> np.ndarray:
        """The test images' ids in the resident array (after the training images)."""
        return self.n_train + np.arange(self.n_test)

    def relabelled(self, ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Host labels like ``host_labels`` but for training examples ``ids``, which have
        ``labels`` instead of their own."""
        out = self.host_labels.copy()
        out[np.asarray(ids, np.int64)] = labels
        return out

    def host_dataset(self) -> Dataset:
        """The host dataset it was put from (for a copy on other devices)."""
        images = sharding.to_host(self.images)
        n = self.n_train
        return Dataset(images[:n], self.host_labels[:n], images[n:], self.host_labels[n:],
                       "resident copy", "arrays", self.classes, *self.stats)


_VERSIONS = itertools.count()


def member_fingerprints(host_state) -> list[str]:
    """Each member's fingerprint in a stacked host state: a hash of its parameters and batch
    statistics (what its predictions depend on), equal for equal members in any process."""
    leaves = jax.tree.leaves((host_state.params, host_state.batch_stats))
    out = []
    for i in range(leaves[0].shape[0]):
        h = hashlib.sha256()
        for leaf in leaves:
            h.update(np.ascontiguousarray(leaf[i]).tobytes())
        out.append(h.hexdigest()[:32])
    return out


class ModelGroup:
    """One stacked group of members (the ensemble, or the baseline as a group of one), with its
    jitted steps, its data on the device and its lineage. Driver-side: it owns mutable state.

    ``versions`` (int ``[m]``) gives each member a new number, unique in the process, whenever
    its parameters or batch statistics change, so scores computed from it stay valid until then.
    """

    def __init__(self, name: str, track: str, arch: str, members: int, cfg: Config, key,
                 data: tuple, devices: int = 1, initialise: bool = True):
        """``track``: whose stages it trains on (`jaxunlearn.stages.TRACKS`); ``data``: host
        arrays (train images, train labels, test images, test labels), or the `Resident` data of
        a group on the same devices, shared (a `jaxunlearn.data.Dataset`, or CIFAR-10's
        arrays). Without
        ``initialise`` the state is only its shape until `load_state_dict` or `set_state`
        (a run restored from a checkpoint initialises nothing)."""
        self.name, self.track = name, track
        spec = ((data.input_shape, data.classes, data.stats) if isinstance(data, Resident) else
                (data.input_shape, data.classes, data.stats) if isinstance(data, Dataset) else
                ((32, 32, 3), CIFAR10_CLASSES, CIFAR10_STATS))
        self._fns = fns = group_functions(cfg, arch, members, devices, *spec)
        self.layout, self.mesh = fns.layout, fns.mesh
        self.substack_policy = (ensemble.SUBSTACK_POLICY.get(fns.layout, "pow2")
                                if cfg.substacks == "auto" else cfg.substacks)
        if self.mesh is not None:
            sharding.check_divisible(members, self.mesh)
        self.key, self.members = key, members
        # The per-member settings whose values differ between the members: each member's
        # value (empty: every member trains alike).
        self.settings = varying(cfg, members)
        # A pretrained initialisation (one member's params and batch statistics, host arrays)
        # every member starts from instead of its random draw; None: random (`set_base`).
        self.base = None
        self.state = (self.initial_state() if initialise else
                      jax.eval_shape(self._fns.init, self._host(key), members))
        self.versions = np.full(members, next(_VERSIONS), np.int64)
        self._fingerprints = None  # (versions, fingerprints) of the last `fingerprints`
        # The members whose predictions count (the rest are shadow members, for evaluation).
        self.predicting = np.ones(members, bool)
        self.data = data if isinstance(data, Resident) else Resident.put(data, self.place)
        self.lineage = Lineage.empty(members, self.data.n_train)
        self.classes = int(jax.eval_shape(fns.logits, self.state, self.data.images,
                                          jnp.zeros(1, jnp.int32)).shape[-1])
        if self.classes != self.data.classes:
            raise ValueError(f"model {arch!r} gives {self.classes} logits for data of "
                             f"{self.data.classes} classes; its factory must use num_classes "
                             f"(jaxunlearn.models.register_model)")

    def voters(self, live: np.ndarray | None = None) -> np.ndarray:
        """bool ``[m]``: the members that predict (no shadow member) among ``live`` (all when
        None)."""
        return self.predicting if live is None else self.predicting & np.asarray(live, bool)

    def fresh(self, name: str, initialise: bool = True) -> "ModelGroup":
        """A new group of the same kind at its initial state (same keys, empty lineage), sharing
        this group's compiled functions and device data: an oracle's starting point. Without
        ``initialise``, only the state's shape (for `load_state_dict`)."""
        other = object.__new__(ModelGroup)
        other.__dict__.update(self.__dict__)
        other.name = name
        other.reinitialise(initialise)
        return other

    def initial_state(self):
        """The members as initialised from the group key, or from the pretrained ``base``
        (bit-identical on every call)."""
        return self._from_base(self._fns.init(self._host(self.key), self.members),
                               np.ones(self.members, bool))

    def set_base(self, base: dict) -> None:
        """Makes ``base`` (``{"params", "batch_stats"}`` of one member, host arrays: a model
        pretrained on data that is never deleted) every member's initialisation, from now on
        and for every member now (their lineage is emptied: nothing is trained yet)."""
        self.base = jax.tree.map(np.asarray, base)
        self.reinitialise()

    def _from_base(self, state, mask: np.ndarray):
        """``state`` with the members in ``mask`` (bool ``[m]``) started from the pretrained
        ``base``; unchanged when the group has none."""
        if self.base is None:
            return state
        base = jax.tree.map(lambda x: self.place(x, sharding.REPLICATED), self.base)
        return self._fns.rebase(state, base, self.place_members(mask))

    def reinitialise(self, initialise: bool = True) -> None:
        """Every member back to its initial state (its shape only, without ``initialise``),
        with an empty lineage."""
        self.state = (self.initial_state() if initialise else
                      jax.eval_shape(self._fns.init, self._host(self.key), self.members))
        self.lineage = Lineage.empty(self.members, self.data.n_train)
        self.versions = np.full(self.members, next(_VERSIONS), np.int64)

    def place(self, x, spec):
        """Host array -> device array: sharded by ``spec`` over the mesh, or on the default
        device."""
        return jnp.asarray(x) if self.mesh is None else sharding.put(x, self.mesh, spec)

    def place_members(self, mask: np.ndarray):
        """A host bool ``[m]`` member mask on the device, sharded like the members."""
        return self.place(np.asarray(mask, bool), sharding.MEMBERS)

    def _host(self, key):
        # Keys enter sharded functions as host values (identical in every process).
        return key if self.mesh is None else np.asarray(key)

    def substacks(self, members: np.ndarray) -> list[np.ndarray]:
        """The stacks of member indices that training ``members`` (bool ``[m]``) runs
        (`jaxunlearn.ensemble.substacks`, in multiples of the device count)."""
        multiple = ((self.mesh.size if self.mesh is not None else 1)
                    * (ensemble.hybrid_group_size(self.layout) or 1))
        return ensemble.substacks(members, multiple, self.substack_policy)

    def gather(self, sel: np.ndarray):
        """The members ``sel`` (int ``[k]``) as a stack of their own."""
        return self._fns.gather(self.state, self.place(np.asarray(sel, np.int32),
                                                       sharding.REPLICATED))

    def scatter(self, sub, sel: np.ndarray, changed: np.ndarray) -> None:
        """Writes the stack ``sub`` back as members ``sel``; ``changed`` (bool ``[m]``) marks
        the members it changed."""
        self.state = self._fns.scatter(self.state, sub, self.place(np.asarray(sel, np.int32),
                                                                   sharding.REPLICATED))
        self._changed(changed)

    def member_hyper(self, sel: np.ndarray):
        """The settings given per member (`settings`) of the members ``sel`` (int ``[k]``, a
        stack's), float32 ``[k]`` arrays on the device sharded like them: `step`'s
        ``hyper``. None when every member trains alike."""
        if not self.settings:
            return None
        return {name: self.place(np.asarray(values, np.float32)[np.asarray(sel)],
                                 sharding.MEMBERS) for name, values in self.settings.items()}

    def step(self, state, idx, weight, active, lr_scale=None, labels=None, hook=None,
             aux=None, hyper=None):
        """One optimiser step of the ``active`` members (device mask ``[k]``) of the stack
        ``state`` on their batches ``idx``/``weight`` ``[k, b]``, their updates scaled by
        ``lr_scale`` ``[k]`` (None: 1); returns the new stack and the loss sums ``[k]``. The
        group's own state is the stack of all its members. ``labels``: resident labels (from
        `Resident.relabelled`) in place of the true ones; ``hook``: a strategy's
        `jaxunlearn.steps.StepHook`, given ``aux`` (each leaf ``[k, ...]``: the stack's
        rows); ``hyper``: the stack's own per-member settings (`member_hyper`), which a group
        with `settings` needs."""
        images = self.data.images
        labels = self.data.labels if labels is None else labels
        return self._fns.step(state, images, labels, idx, weight, active, lr_scale, aux, hyper,
                              hook=hook)

    def gradients(self, ids: list[np.ndarray], batch_size: int):
        """Each member's gradient of its cross-entropy summed over its own examples ``ids[i]``
        (int arrays, one per member; empty: a zero gradient), in batches of ``batch_size``:
        a params-shaped stack ``[m, ...]`` on the device (SalUn's saliency)."""
        images, labels = self.data.images, self.data.labels
        total = None
        steps = max(1, max(-(-len(x) // batch_size) for x in ids))
        for s in range(steps):
            idx = np.zeros((self.members, batch_size), np.int32)
            weight = np.zeros((self.members, batch_size), np.float32)
            for i, x in enumerate(ids):
                part = np.asarray(x[s * batch_size:(s + 1) * batch_size], np.int32)
                idx[i, :len(part)], weight[i, :len(part)] = part, 1.0
            g = self._fns.grads(self.state, images, labels,
                                self.place(idx, sharding.MEMBERS),
                                self.place(weight, sharding.MEMBERS))
            total = g if total is None else jax.tree.map(jnp.add, total, g)
        return total

    def set_trained(self, state, members: np.ndarray) -> None:
        """Takes ``state``, the whole stack, after training ``members`` (bool ``[m]``)."""
        self.state = state
        self._changed(members)

    def reset_optimizer(self, mask: np.ndarray | None = None) -> None:
        """Fresh optimiser state for the members in ``mask`` (bool ``[m]``; all when None)."""
        mask = np.ones(self.members, bool) if mask is None else np.asarray(mask, bool)
        self.state = self._fns.reset_optimizer(self.state, self.place_members(mask))

    def unlearn(self, key, invalid: np.ndarray) -> None:
        """Reinitialises the ``invalid`` members (bool ``[m]``) from ``key`` (from the
        pretrained ``base`` when the group has one, with a member key drawn from ``key``)."""
        invalid = np.asarray(invalid, bool)
        self.state = self._from_base(self._fns.unlearn(self._host(key), self.state,
                                                       self.place_members(invalid)), invalid)
        self._changed(invalid)

    def host_state(self):
        """The whole stacked state as numpy (gathered from every process)."""
        return jax.tree.map(sharding.to_host, self.state)

    def set_state(self, host_state) -> None:
        """Replaces the whole stacked state by ``host_state`` (numpy, as from `host_state`)."""
        self.state = jax.tree.map(lambda x: self.place(x, sharding.MEMBERS), host_state)
        self._changed(np.ones(self.members, bool))

    def set_members(self, mask: np.ndarray, host_state) -> None:
        """Replaces the members in ``mask`` by their rows of ``host_state`` (a stacked numpy
        state, as from `host_state`); the others keep their current state."""
        mask = np.asarray(mask, bool)
        current = self.host_state()

        def pick(new, old):
            return np.where(mask.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)

        merged = jax.tree.map(pick, host_state, current)
        self.state = jax.tree.map(lambda x: self.place(x, sharding.MEMBERS), merged)
        self._changed(mask)

    def _changed(self, mask: np.ndarray) -> None:
        self.versions = np.where(np.asarray(mask, bool), next(_VERSIONS), self.versions)

    def state_from_dict(self, state: dict):
        """A stacked numpy state from its state dict (`flax.serialization.to_state_dict` of
        `host_state`), checked against this group's structure."""
        return flax.serialization.from_state_dict(self.state, state)

    def member_logits(self, batch_size: int, ids: np.ndarray | None = None,
                      members: np.ndarray | None = None) -> np.ndarray:
        """Logits ``[m, n, classes]`` on resident images ``ids`` (training ids, or
        ``data.test_ids``; default: the test set) of ``members`` (bool ``[m]``; default all),
        computed as sub-stacks of those members only; the other members' rows are NaN."""
        ids = self.data.test_ids if ids is None else np.asarray(ids)
        members = (np.ones(self.members, bool) if members is None
                   else np.asarray(members, bool))
        n = len(ids)
        parts = self.substacks(members)
        out = np.full((self.members, n, self.classes), np.nan, np.float32)
        for sel in parts:
            whole = np.array_equal(sel, np.arange(self.members))
            state = self.state if whole else self.gather(sel)
            logits = self._stack_logits(state, ids, batch_size)
            real = members[sel]
            out[sel[real]] = logits[real]
        return out

    def _stack_logits(self, state, ids: np.ndarray, batch_size: int) -> np.ndarray:
        images, n, out = self.data.images, len(ids), []
        if 0 < n < batch_size:  # a few ids (a request's): a batch of the next power of two,
            batch_size = min(batch_size, max(8, 1 << (n - 1).bit_length()))  # not a full one
        for start in range(0, n, batch_size):
            idx = ids[np.arange(start, start + batch_size) % n].astype(np.int32)  # wrap last
            logits = self._fns.logits(state, images, self.place(idx, sharding.REPLICATED))
            out.append(sharding.to_host(logits))
        k = jax.tree.leaves(state)[0].shape[0]
        return np.concatenate(out, axis=1)[:, :n] if out else np.zeros((k, 0, self.classes))

    def fingerprints(self, host_state=None) -> list[str]:
        """Each member's fingerprint (`member_fingerprints`), computed once per member version;
        ``host_state``: the state as from `host_state`, when at hand."""
        if self._fingerprints is None or not np.array_equal(self._fingerprints[0],
                                                            self.versions):
            host = self.host_state() if host_state is None else host_state
            self._fingerprints = (self.versions.copy(), member_fingerprints(host))
        return self._fingerprints[1]

    # ---- durable state -------------------------------------------------------------------

    def state_dict(self) -> dict:
        host = self.host_state()
        self.fingerprints(host)
        return {"state": flax.serialization.to_state_dict(host),
                "lineage": {"seen": self.lineage.seen, "born": self.lineage.born},
                **({"base": self.base} if self.base is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        if "base" in state:
            self.base = jax.tree.map(np.asarray, state["base"])
        host = self.state_from_dict(state["state"])
        self.set_state(host)
        self.fingerprints(host)
        self.lineage.seen[:] = state["lineage"]["seen"]
        self.lineage.born[:] = state["lineage"]["born"]
