"""Run configuration: one frozen dataclass whose every setting is declared once, with its
default and its `Rule` (allowed values or range, help, whether it may change on resume, before
the first deletion, or between compared runs); named presets (`PRESETS`, described in
`PRESET_HELP`); ``key=value`` overrides. The checks that need the data or the package's parts
are `jaxunlearn.validation`.

A plug-in (a strategy, an evaluator) declares its own settings with the same `setting`
(`declare`): a `Config` takes them like its own fields (``cfg.neggrad_beta``, overrides,
`problems`, ``to_dict``), the package's plug-ins' always, another module's while the config
uses that plug-in. This module imports nothing of the package, except the package's own
plug-ins (`BUILTIN_PLUGINS`) the first time a declared setting is asked for.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import typing
from typing import Mapping


class ConfigError(ValueError):
    """A configuration that cannot work; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a setting accepts and how it may change: its one declaration (`setting`).

    ``choices``: the values it takes (empty: any, or a registry's: ``registry`` names it);
    ``at_least``/``above`` and ``at_most``/``below``: its range (numbers; NaN never passes).
    ``resume``: may change when a run resumes (with ``--allow-config-change``: how the rest of
    the run trains, evaluates or is stored, not what its checkpoints mean); ``unlearning``: says
    only how deletions are unlearned (may change while nothing is deleted, and in a `fork`);
    ``trains``: changes the trained models (a `fork` may not change it, even when a resume
    may); ``compare``: may differ between the runs `jaxunlearn report` compares;
    ``per_member``: may take one value per stacked member (`member_values`), each checked
    against the rule: a stacked run is then a sweep of it.
    """

    help: str
    choices: tuple = ()
    registry: str = ""
    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None
    resume: bool = False
    unlearning: bool = False
    trains: bool = False
    compare: bool = False
    per_member: bool = False

    def problem(self, name: str, value) -> str | None:
        """Why ``value`` is not allowed for setting ``name`` (None when it is)."""
        if self.choices and value not in self.choices:
            return f"unknown {name} {value!r}; choose one of {', '.join(map(str, self.choices))}"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            low = (self.at_least, "[") if self.at_least is not None else (self.above, "(")
            high = (self.at_most, "]") if self.at_most is not None else (self.below, ")")
            ok = value == value and all((
                self.at_least is None or value >= self.at_least,
                self.above is None or value > self.above,
                self.at_most is None or value <= self.at_most,
                self.below is None or value < self.below))
            if ok:
                return None
            if high[0] is None and low[1] == "[":
                return f"{name} must be at least {low[0]:g}, got {value}"
            if high[0] is None:
                return f"{name} must be more than {low[0]:g}, got {value}"
            if low[0] is None:
                return f"{name} must be {'at most' if high[1] == ']' else 'less than'} " \
                       f"{high[0]:g}, got {value}"
            return f"{name} must be in {low[1]}{low[0]:g}, {high[0]:g}{high[1]}, got {value}"
        return None


def setting(default, help: str, **rule):
    """A `Config` field with its `Rule`."""
    return dataclasses.field(default=default, metadata={"rule": Rule(help, **rule)})


_SPLITS = "counts from the start of the split; 0: all"


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a run, each declared once with its default and `Rule` (`RULES`);
    `jaxunlearn presets -v` prints them with their help."""

    preset: str = setting("demo", "the preset the run started from (a name only)", compare=True)
    seed: int = setting(0, "the run's random seed: samples, batch orders, keys", at_least=0)
    # Data
    data: str = setting("sample", "sample, cifar10 (auto: $JAXUNLEARN_DATA, the download or "
                                  "tfds), tfds[:DIR], a CIFAR-10 folder or archive, an .npz "
                                  "file of arrays, or a registered name (jaxunlearn.data."
                                  "register_dataset)",
                        resume=True)
    train_limit: int = setting(0, f"training examples used, {_SPLITS}", at_least=0)
    test_limit: int = setting(0, f"test examples used, {_SPLITS}", at_least=0)
    # Ensemble
    members: int = setting(5, "ensemble members", at_least=1)
    model: str = setting("resnet18", "the members' net (jaxunlearn.models.MODELS: built-in "
                                     "or registered)",
                         registry="models")
    stem: str = setting("imagenet", "ResNet stem: imagenet (7x7 stride 2, max-pool) or cifar "
                                    "(3x3 stride 1)", choices=("imagenet", "cifar"))
    member_parallel: str = setting("auto", "member layout: auto (the measured fastest), vmap, "
                                           "map, unroll, hybrid:K", registry="layouts",
                                   resume=True, compare=True)
    substacks: str = setting("auto", "how a retraining of some members cuts them into stacks",
                             choices=("auto", "pow2", "ones", "exact", "full"), resume=True,
                             compare=True)
    precision: str = setting("fp32", "fp32, or bf16 compute with fp32 parameters and "
                                     "optimizer state", choices=("fp32", "bf16"))
    devices: int = setting(1, "shard the member axis over N devices (0: all, 1: none)",
                           at_least=0, resume=True, compare=True)
    aggregation: str = setting("mean_logits", "how members' predictions combine",
                               choices=("mean_logits", "mean_probs", "vote"))
    # A pretrained initialisation
    pretrain: int = setting(0, "the last N training examples, declared never deletable, "
                               "pretrain one model every member starts from and is reset to "
                               "(0: random initialisation)", at_least=0)
    pretrain_epochs: int = setting(5, "epochs of the pretraining", at_least=1)
    pretrain_batch_size: int = setting(0, "batch size of the pretraining (0: batch_size)",
                                       at_least=0)
    pretrain_lr: float = setting(0.0, "learning rate of the pretraining (0: learning_rate)",
                                 at_least=0)
    # Phases and sampling
    phases: int = setting(5, "chunks the training set arrives in", at_least=1)
    plan: str = setting("bootstrap", "each member's sample: bootstrap (of the working set), "
                                     "subset (of the new chunk), shards (SISA: disjoint, "
                                     "fraction=1)", choices=("bootstrap", "subset", "shards"))
    fraction: float = setting(0.2, "the share a bootstrap or subset sample draws", above=0,
                              at_most=1)
    slices: int = setting(1, "shards plan: rewind points per phase (slices of each new shard)",
                          at_least=1)
    # Training
    epochs: int = setting(50, "epochs per phase (per stage with slices)", at_least=1,
                          resume=True, trains=True)
    batch_size: int = setting(512, "training batch per member", at_least=1, resume=True,
                              trains=True)
    eval_batch_size: int = setting(1000, "scoring batch", at_least=1, resume=True)
    optimizer: str = setting("adam", "adam, adamw or sgd (Nesterov)",
                             choices=("adam", "adamw", "sgd"))
    learning_rate: float = setting(1e-3, "peak learning rate", above=0, resume=True,
                                   trains=True, per_member=True)
    weight_decay: float = setting(0.0, "sgd: added to the gradient; adamw: decoupled",
                                  at_least=0, resume=True, trains=True, per_member=True)
    momentum: float = setting(0.9, "sgd: Nesterov momentum", at_least=0, below=1, resume=True,
                              trains=True, per_member=True)
    lr_schedule: str = setting("constant", "constant, or onecycle (warm up, then down to 0, "
                                           "each phase)", choices=("constant", "onecycle"),
                               resume=True, trains=True)
    lr_warmup: float = setting(0.2, "onecycle: the share of a phase spent warming up",
                               at_least=0, below=1, resume=True, trains=True)
    label_smoothing: float = setting(0.0, "label smoothing of the training loss", at_least=0,
                                     below=1, resume=True, trains=True, per_member=True)
    tta: bool = setting(False, "scoring averages each image's logits with its mirror image's",
                        resume=True)
    reset_optimizer_each_phase: bool = setting(True, "a fresh optimizer state each phase")
    augment: bool = setting(False, "random crop and flip on the device")
    eval_every_epoch: bool = setting(True, "score the test set after every epoch", resume=True)
    # Checkpoints (orbax, in the run folder)
    checkpoint_every: int = setting(0, "also checkpoint every N steps inside a phase (0: "
                                       "phase ends only)", at_least=0, resume=True,
                                    compare=True)
    keep_checkpoints: int = setting(2, "the newest K complete checkpoints are kept",
                                    at_least=1, resume=True, compare=True)
    # Deletions and unlearning
    deletion_rate: float = setting(1e-4, "random schedule: int(rate x arrived examples) ids "
                                         "after phases 1..P-1", at_least=0, below=1)
    deletions: str = setting("", "an explicit JSON schedule {phase: [ids]} (replaces the "
                                 "random one)")
    strategy: str = setting("replace", "exact: replace, rewind, oracle; approximate: finetune, "
                                       "neggrad, random_labels, salun, scrub",
                            registry="strategies", unlearning=True, compare=True)
    oracle_reference: str = setting("end", "when to train the oracle for comparison",
                                    choices=("none", "end", "deletions"), resume=True,
                                    unlearning=True, compare=True)
    # Evaluation of unlearning
    evaluators: str = setting("scores,mia", "comma-separated: scores (forget/retain/test), mia, "
                                            "lira, lira_online", registry="evaluators",
                              resume=True, compare=True)
    shadow_members: int = setting(0, "extra members trained and unlearned as lira's reference "
                                     "models only, never predicting", at_least=0,
                                  compare=True)
    # Baseline: one model trained the same way on its own sample
    baseline: str = setting("resnet152", "the baseline's net, or none", registry="models")
    baseline_plan: str = setting("bootstrap", "bootstrap (the original), subset, full (the "
                                              "working set)",
                                 choices=("bootstrap", "subset", "full"))
    baseline_fraction: float = setting(0.2, "the share the baseline's sample draws", above=0,
                                       at_most=1)
    baseline_epochs: int = setting(0, "epochs per phase of the baseline (0: epochs)",
                                   at_least=0)
    baseline_unlearning: str = setting("auto", "none (it keeps what it saw), oracle (retrained "
                                               "without the ids); auto: oracle iff "
                                               "strategy=oracle",
                                       choices=("auto", "none", "oracle"), unlearning=True,
                                       compare=True)

    # The values of plug-ins' settings (`declare`) given to this config; a declared setting
    # not given has its declared default. Read them as attributes: ``cfg.neggrad_beta``.
    plugin_settings: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __getattr__(self, name: str):
        # Only called for what is not a field: a plug-in's setting.
        if name.startswith("__") or name == "plugin_settings":
            raise AttributeError(name)
        field = declared().get(name)
        if field is None:
            raise AttributeError(f"Config has no setting {name!r}; a plug-in's settings exist "
                                 f"once its module is imported")
        return self.__dict__.get("plugin_settings", {}).get(name, field.default)

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and self._values() == other._values()

    def _values(self) -> dict:
        unknown = {k: v for k, v in self.plugin_settings.items() if k not in declared()}
        return {**self.to_dict(), **unknown}

    def __post_init__(self):
        # A per-member setting given as a list (the API, a config.json) is kept as a tuple, so
        # the config stays hashable; a single value is kept as that value (every member's).
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("rule") and f.metadata["rule"].per_member and isinstance(value, (list, tuple)):
                value = tuple(value)
                object.__setattr__(self, f.name, value[0] if len(value) == 1 else value)

    def to_dict(self) -> dict:
        """Every setting and its value: the fields, then the declared settings of the package's
        plug-ins and of the other plug-ins this config uses (`in_use`)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != _PLUGIN_FIELD}
        out.update((name, getattr(self, name)) for name in declared() if in_use(self, name))
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


_PLUGIN_FIELD = "plugin_settings"
_CORE = tuple(f.name for f in dataclasses.fields(Config) if f.name != _PLUGIN_FIELD)
_dataclass_init = Config.__init__


def _init(self, *positional, plugin_settings: dict | None = None, **settings):
    """`Config`'s constructor: its fields by name, and any other ``name=value`` as a plug-in's
    setting (checked by `problems` once the plug-ins are imported)."""
    if positional:
        raise TypeError(f"Config takes settings by name (Config(members=3, ...)), got "
                        f"{len(positional)} positional argument(s)")
    extra = dict(plugin_settings or {})
    extra.update({k: settings.pop(k) for k in list(settings) if k not in _CORE})
    _dataclass_init(self, **settings, plugin_settings=extra)


Config.__init__ = _init

RULES: dict[str, Rule] = {f.name: f.metadata["rule"] for f in dataclasses.fields(Config)
                          if f.name != _PLUGIN_FIELD}
# Derived from the rules: what a resumed run, a run with nothing deleted (and a fork), and the
# runs `report` compares may change. `declare` adds the plug-ins' settings to these.
RESUMABLE_CHANGES = {k for k, r in RULES.items() if r.resume}
UNLEARNING_CHANGES = {k for k, r in RULES.items() if r.unlearning}
FORK_CHANGES = {k for k, r in RULES.items() if (r.resume or r.unlearning) and not r.trains}
COMPARABLE_CHANGES = {k for k, r in RULES.items() if r.compare}

# The package's own plug-ins, whose settings every config has: imported when a declared
# setting is first asked for.
BUILTIN_PLUGINS = ("jaxunlearn.strategies", "jaxunlearn.evaluators")
_DECLARED: dict[str, dataclasses.Field] = {}  # setting -> its declaration (`declare`)
_OWNERS: dict[str, str] = {}  # setting -> the class that declared it ("module.Class")
_USERS: dict[str, set] = {}  # setting -> {(registry, plug-in name)} using it
_BUILTIN: set[str] = set()  # the settings the package's own plug-ins declare
_loaded = False


def declare(settings: Mapping[str, dataclasses.Field], owner: str, registry: str = "",
            name: str = "") -> None:
    """Adds a plug-in's ``settings`` (``{name: setting(default, help, **rule)}``; a setting's
    type is its default's) to those every `Config` knows. ``owner``: the declaring class,
    ``"module.Class"`` (a class of the package: the setting is in every config; another: only
    in a config that uses the plug-in); ``registry``/``name``: a plug-in that uses them, as
    the settings naming plug-ins refer to it (``strategies``/``gradascent``). Declaring a
    setting again with the same default and rule adds a user; ConfigError otherwise."""
    for key, field in settings.items():
        rule = field.metadata.get("rule") if isinstance(field, dataclasses.Field) else None
        if rule is None:
            raise ConfigError(f"{owner} declares {key!r} without config.setting(default, help, "
                              f"...); declare it with config.setting")
        if rule.per_member:
            raise ConfigError(f"{owner} declares {key!r} per_member: only the core optimiser "
                              f"settings ({', '.join(PER_MEMBER)}) take one value per member; "
                              f"declare it with one value")
        if key in _CORE or key == _PLUGIN_FIELD:
            raise ConfigError(f"{owner} declares setting {key!r}, which the core configuration "
                              f"has; give the plug-in's setting another name")
        old = _DECLARED.get(key)
        if old is not None and (old.default, old.metadata["rule"]) != (field.default, rule):
            raise ConfigError(f"setting {key!r} is declared by {_OWNERS[key]} and differently "
                              f"by {owner}; give one of them another name")
        if old is None:
            field.name = key
            _DECLARED[key], _OWNERS[key], RULES[key] = field, owner, rule
            for changes, yes in ((RESUMABLE_CHANGES, rule.resume),
                                 (UNLEARNING_CHANGES, rule.unlearning),
                                 (FORK_CHANGES, (rule.resume or rule.unlearning)
                                  and not rule.trains),
                                 (COMPARABLE_CHANGES, rule.compare)):
                if yes:
                    changes.add(key)
        if owner.startswith("jaxunlearn."):
            _BUILTIN.add(key)
        if registry and name:
            _USERS.setdefault(key, set()).add((registry, name))


def declare_class(cls: type, registry: str, name: str = "") -> None:
    """Declares the ``settings`` class attribute of a plug-in class and of its bases
    (`declare`), used by the plug-in ``name`` of ``registry`` when it has one."""
    for klass in cls.__mro__:
        own = klass.__dict__.get("settings")
        if own:
            declare(own, f"{klass.__module__}.{klass.__qualname__}", registry, name)


def declared() -> dict[str, dataclasses.Field]:
    """The plug-ins' settings declared so far (`declare`), the package's own plug-ins'
    always: setting -> its declaration."""
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN_PLUGINS:
            importlib.import_module(module)
    return _DECLARED


def owner(name: str) -> str:
    """The class that declared plug-in setting ``name`` (``"module.Class"``)."""
    declared()
    return _OWNERS[name]


def in_use(cfg: Config, name: str) -> bool:
    """Whether ``cfg`` has declared setting ``name``: always for the package's plug-ins',
    else when ``cfg`` names a plug-in that uses it (e.g. ``strategy=gradascent``)."""
    if name in _BUILTIN:
        return True
    return any(plugin in referenced(cfg, registry) for registry, plugin in _USERS.get(name, ()))


def referenced(cfg: Config, registry: str) -> list[str]:
    """The names ``cfg``'s settings of ``registry`` (`Rule.registry`: ``strategies``,
    ``evaluators``, ``models``) give, in order (comma-separated lists split)."""
    out = []
    for key in _CORE:
        if RULES[key].registry == registry:
            out += [n.strip() for n in str(getattr(cfg, key)).split(",") if n.strip()]
    return out


def kind_of(name: str) -> type:
    """The type of setting ``name``: a field's annotation, a declared setting's default's."""
    if name in _CORE:
        return typing.get_type_hints(Config)[name]
    return type(declared()[name].default)


def defaults() -> dict:
    """Every setting's default, the declared ones' included."""
    out = {f.name: f.default for f in dataclasses.fields(Config) if f.name != _PLUGIN_FIELD}
    out.update((k, f.default) for k, f in declared().items())
    return out
# The settings that may take one value per stacked member (`member_values`).
PER_MEMBER = tuple(k for k, r in RULES.items() if r.per_member)


def choices(name: str) -> tuple:
    """The values setting ``name`` takes, as declared (the modules implementing them use
    these)."""
    return RULES[name].choices


def is_a(value, kind: type) -> bool:
    """Whether ``value`` is of the plain type ``kind`` as settings and JSON records mean it: a
    bool is no number, and a float may be written as an int."""
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def problems(cfg: "Config") -> list[str]:
    """Every setting of the wrong type or outside its declared choices or range."""
    declared()
    out = [f"unknown setting {k!r}: no imported plug-in declares it; import the module that "
           f"does (--plugin MODULE) or drop it" for k in cfg.plugin_settings if k not in RULES]
    for name, rule in RULES.items():
        value, kind = getattr(cfg, name), kind_of(name)
        if rule.per_member and isinstance(value, tuple):
            out += _per_member_problems(cfg, name, rule, value, kind)
            continue
        problem = (f"{name} takes {kind.__name__}, got {value!r}" if not is_a(value, kind)
                   else rule.problem(name, value))
        if problem is not None:
            out.append(problem)
    return out


def stacked_members(cfg: "Config") -> int:
    """The members the ensemble stacks: ``members`` predicting, then ``shadow_members``."""
    return cfg.members + cfg.shadow_members


def _per_member_problems(cfg: "Config", name: str, rule: Rule, values: tuple,
                         kind: type) -> list[str]:
    """What is wrong with the per-member ``values`` of setting ``name``: their count, or one
    of them."""
    out = []
    stacked = stacked_members(cfg) if is_a(cfg.members, int) and is_a(cfg.shadow_members, int) \
        else None
    if stacked is not None and len(values) != stacked:
        shadow = (f" (members={cfg.members}, then shadow_members={cfg.shadow_members})"
                  if cfg.shadow_members else "")
        out.append(f"{name} has {len(values)} values; give one value for every member or "
                   f"{stacked}, one per stacked member{shadow}")
    for value in values:
        problem = (f"{name} takes {kind.__name__} values, got {value!r}" if not is_a(value, kind)
                   else rule.problem(name, value))
        if problem is not None:
            out.append(problem)
    return out


def member_values(cfg: "Config", name: str, members: int) -> tuple:
    """Each of the ``members`` stacked members' value of the per-member setting ``name``: its
    one value repeated (also when all its values are equal), or its values, one per member
    (`ConfigError` when they are not ``members``)."""
    value = getattr(cfg, name)
    if not isinstance(value, tuple):
        return (value,) * members
    if len(set(value)) == 1:
        return (value[0],) * members
    if len(value) != members:
        raise ConfigError(f"{name} has {len(value)} values, one per member, for a stack of "
                          f"{members} model(s); give one value for all, or {members}")
    return value


def varying(cfg: "Config", members: int) -> dict[str, tuple]:
    """The per-member settings whose values differ between the ``members`` stacked members,
    each with every member's value (empty when all train alike)."""
    out = {}
    for name in PER_MEMBER:
        values = member_values(cfg, name, members)
        if len(set(values)) > 1:
            out[name] = values
    return out


# The fast nets' recipe (one air-s on full CIFAR-10 in 5 epochs: the `air-s-single` preset;
# its accuracy and time are in docs/results.md).
AIR_RECIPE = dict(stem="cifar", optimizer="sgd", learning_rate=0.8, momentum=0.9,
                  weight_decay=5e-4, lr_schedule="onecycle", lr_warmup=0.2, label_smoothing=0.2,
                  augment=True, tta=True)

PRESETS: dict[str, Config] = {
    "smoke": Config(preset="smoke", train_limit=300, test_limit=100, members=3, model="tiny",
                    phases=3, epochs=1, batch_size=16, eval_batch_size=100, deletion_rate=0.01,
                    baseline="tiny"),
    # SISA shards: each deleted id invalidates the one member that holds it. Small batches and
    # a learning rate scaled down with them: a member's shard is 40 images per phase.
    "demo": Config(preset="demo", **{**AIR_RECIPE, "learning_rate": 0.2}, members=5,
                   model="air-s", baseline="air-s", baseline_plan="full", plan="shards",
                   fraction=1.0, epochs=6, batch_size=20, eval_batch_size=300,
                   eval_every_epoch=False, deletion_rate=0.005, strategy="rewind",
                   oracle_reference="none"),
    "resnet-demo": Config(preset="resnet-demo", train_limit=500, test_limit=300, epochs=3,
                          batch_size=50, eval_batch_size=300, eval_every_epoch=False,
                          deletion_rate=0.01),
    "seed": Config(preset="seed", data="cifar10"),
    # The fast family's recipe check: one air-s on all of CIFAR-10, nothing deleted.
    "air-s-single": Config(preset="air-s-single", **AIR_RECIPE, data="cifar10", members=1,
                           model="air-s", baseline="none", phases=1, plan="subset",
                           fraction=1.0, epochs=5, batch_size=256, eval_every_epoch=False,
                           deletion_rate=0.0, oracle_reference="none", keep_checkpoints=1),
    # The original protocol at CPU scale: its structure (5 chunks of 10,000, 5 members on 20%
    # bootstraps, 1+2+3+4 deletions, scores every phase) on air-s nets; beside it one air-m
    # given the ensemble's training compute: 0.76 x 2 epochs x 0.126 GFLOPs per image against
    # 5 x 0.2 x 6 epochs x 0.032 (within 1%).
    "protocol": Config(preset="protocol", **{**AIR_RECIPE, "learning_rate": 0.4},
                       data="cifar10", model="air-s", epochs=6, batch_size=128,
                       eval_every_epoch=False, strategy="rewind", oracle_reference="none",
                       retain_eval=2000, baseline="air-m", baseline_plan="subset",
                       baseline_fraction=0.76, baseline_epochs=2),
    # A memorising regime for membership inference (Carlini et al.'s LiRA setting): 16 air-s
    # on random halves of a 2,000-image CIFAR-10 pool, trained to about 100% training accuracy,
    # so each example has about 8 members that trained on it and 8 that did not. Nothing is
    # deleted by schedule: `experiments/privacy.py` forks the trained run per method and
    # forgets fixed id sets.
    "privacy": Config(preset="privacy", **{**AIR_RECIPE, "learning_rate": 0.2, "augment": False,
                                           "tta": False},
                      data="cifar10", train_limit=2000, test_limit=1000, model="air-s",
                      members=16, plan="subset", fraction=0.5, phases=1, epochs=15,
                      batch_size=64, eval_batch_size=500, eval_every_epoch=False,
                      deletion_rate=0.0, strategy="rewind", oracle_reference="none",
                      baseline="none", retain_eval=2000, keep_checkpoints=1,
                      evaluators="scores,mia,lira,lira_online"),
}
PRESET_HELP = {
    "smoke": "tiny nets, 300 sample images, 3 phases, 1 epoch: seconds (tests)",
    "demo": "5 air-s nets on SISA shards vs one air-s on all the data, the bundled "
            "1,000-image sample, 5 phases, 10 deletions, rewind: 2 minutes on a CPU",
    "resnet-demo": "5 ResNet-18s vs a ResNet-152 (the original's shape) on 500 sample images: "
                   "about 10 minutes on a CPU",
    "seed": "the original protocol on full CIFAR-10 (50 epochs/phase, batch 512): GPU recommended",
    "protocol": "the original protocol's structure on full CIFAR-10 with 5 air-s nets (6 "
                "epochs/phase) vs one air-m given the same compute: about 55 minutes on 2 CPU cores",
    "privacy": "16 air-s on random halves of a 2,000-image CIFAR-10 pool, trained to memorise "
               "(the LiRA setting); experiments/privacy.py unlearns it every way",
    "air-s-single": "one air-s on full CIFAR-10, 5 epochs (the fast family's recipe): about 7 "
                    "minutes on 2 CPU cores",
}


def epochs_of(cfg: Config, track: str) -> int:
    """Epochs per phase of a model group: ``baseline_epochs`` for the baseline when set (to
    match its training compute to the ensemble's), else ``epochs``."""
    return cfg.baseline_epochs if track == "baseline" and cfg.baseline_epochs else cfg.epochs


def _coerce(field: dataclasses.Field, text: str):
    if field.metadata["rule"].per_member and "," in text:  # one value per member
        try:
            values = tuple(_coerce(field, part) for part in text.split(","))
        except ConfigError:
            raise ConfigError(f"{field.name} takes a number, or one per member separated by "
                              f"commas (e.g. {field.name}=0.1,0.05), got {text!r}") from None
        return values[0] if len(values) == 1 else values
    kind = kind_of(field.name)
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{field.name} takes true or false, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        noun = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
        if field.metadata["rule"].per_member:
            noun += f", or one per member separated by commas (e.g. {field.name}=0.1,0.05)"
        raise ConfigError(f"{field.name} takes {noun}, got {text!r}") from None


def apply_overrides(config: Config, overrides: list[str] | dict) -> Config:
    """Applies ``["key=value", ...]`` (or a dict) to a config, with typed parsing."""
    fields = {**{f.name: f for f in dataclasses.fields(Config) if f.name != _PLUGIN_FIELD},
              **declared()}
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides]
    changes = {}
    for key, value in items:
        if key not in fields:
            raise ConfigError(f"unknown setting {key!r}; settings are: {', '.join(sorted(fields))}"
                              f" (a plug-in's settings need its module imported: --plugin "
                              f"MODULE)")
        if isinstance(value, (list, tuple)) and not RULES[key].per_member:
            raise ConfigError(f"{key} takes one value, got {value!r}; the settings that take "
                              f"one value per member are {', '.join(PER_MEMBER)}")
        changes[key] = _coerce(fields[key], value) if isinstance(value, str) else value
    return dataclasses.replace(config, **changes)


def _split(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. epochs=2")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


ORACLE_REFERENCES = ("none", "end", "deletions")
BASELINE_PLANS = ("bootstrap", "subset", "full")


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]
