"""Run configuration: one frozen dataclass, named presets, ``key=value`` overrides.

Presets:

* ``smoke``: tiny nets on 300 examples of the bundled sample, 3 phases, 1 epoch. Seconds; the
  tests run it end to end.
* ``demo`` (the default): 5 ``air-s`` nets on SISA shards of the bundled 1,000-image sample
  against one ``air-s`` on all of it, 5 phases, ten deletions, rewind: about 2 minutes on two
  CPU cores.
* ``resnet-demo``: the original protocol's shape (5 phases, 5 ResNet-18s with the ImageNet
  stem, 20% bootstrap per member per phase, ten deletions, a ResNet-152 baseline) on the first
  500 training and 300 test images of the bundled sample, 3 epochs per phase, batch 50,
  evaluation after each phase. About 10 minutes on two CPU cores.
* ``seed``: the original protocol at full scale on full CIFAR-10 (50 epochs, Adam 1e-3, batch
  512, deletions of ``int(1e-4 * |working set|)`` ids after phases 1-4, evaluation after every
  epoch), with the original's defects fixed (cumulative lineage, the baseline's BatchNorm in
  training mode, true mean cross-entropy). GPU recommended.
* ``protocol``: the original protocol's structure on full CIFAR-10 with the fast ``air-s``
  nets (6 epochs per phase, rewind), against one ``air-m`` given the same training compute: the
  original's experiment at CPU scale.
"""

from __future__ import annotations

import dataclasses
import json
import typing


class ConfigError(ValueError):
    """A configuration that cannot work; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Config:
    preset: str = "demo"
    seed: int = 0
    # Data
    data: str = "sample"  # "sample", "cifar10" (auto: $JAXUNLEARN_DATA or tfds), "tfds[:DIR]", a path
    train_limit: int = 0  # use only the first N training examples (0: all)
    test_limit: int = 0  # use only the first N test examples (0: all)
    # Ensemble
    members: int = 5
    model: str = "resnet18"
    stem: str = "imagenet"
    member_parallel: str = "auto"  # auto, vmap, map, unroll, hybrid:K (vmap groups of K, map over groups)
    substacks: str = "auto"  # how a retraining of some members cuts them: auto, pow2, ones, exact, full
    precision: str = "fp32"  # fp32, or bf16 compute with fp32 parameters and optimizer state
    devices: int = 1  # shard the member axis over N devices with shard_map (0: all, 1: none)
    aggregation: str = "mean_logits"  # mean_logits, mean_probs, vote
    # A pretrained initialisation: the last N training examples are declared never deletable
    # and only pretrain one model (pretrain_epochs at pretrain_batch_size and pretrain_lr; 0:
    # batch_size, learning_rate), which every member starts from and is reset to when
    # unlearned. The chunks, shards and deletions use the other examples; a request for one of
    # the N is refused. 0: members start from random weights.
    pretrain: int = 0
    pretrain_epochs: int = 5
    pretrain_batch_size: int = 0
    pretrain_lr: float = 0.0
    # Phases and sampling
    phases: int = 5
    plan: str = "bootstrap"  # bootstrap, subset, shards (SISA: disjoint shards; needs fraction=1)
    fraction: float = 0.2
    slices: int = 1  # shards plan: rewind points per phase (slices of each new shard)
    # Training
    epochs: int = 50
    batch_size: int = 512
    eval_batch_size: int = 1000
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd: Nesterov momentum
    lr_schedule: str = "constant"  # constant, onecycle (warm up, then down to 0, each phase)
    lr_warmup: float = 0.2  # onecycle: the fraction of a phase spent warming up
    label_smoothing: float = 0.0
    tta: bool = False  # evaluation averages each image's logits with its mirror image's
    reset_optimizer_each_phase: bool = True
    augment: bool = False
    eval_every_epoch: bool = True
    # Checkpoints (orbax, in the run folder): after every phase, and every N steps when N > 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2  # the newest K complete checkpoints are kept
    # Deletions and unlearning
    deletion_rate: float = 1e-4  # random schedule: int(rate * |working set|) ids after phases 1..P-1
    deletions: str = ""  # path of an explicit JSON schedule (replaces the random one)
    # exact: replace, rewind (to the last clean state), oracle (from scratch); approximate:
    # finetune, neggrad, random_labels, salun, scrub (`jaxunlearn.strategies.NAMES`)
    strategy: str = "replace"
    oracle_reference: str = "end"  # none, end, deletions: when to train the oracle for comparison
    # Approximate strategies (finetune, neggrad, random_labels): epochs on each invalid member's
    # retained sample, at a constant learning rate of unlearn_lr x learning_rate
    unlearn_epochs: int = 2
    unlearn_lr: float = 0.1
    neggrad_beta: float = 0.999  # NegGrad+: beta x retain loss - (1 - beta) x forget loss
    salun_sparsity: float = 0.5  # SalUn: the quantile of |forget gradient| below which weights stay
    # Evaluation of unlearning
    # comma-separated: scores (forget/retain/test), mia, lira, lira_online
    evaluators: str = "scores,mia"
    retain_eval: int = 10000  # at most this many retained training examples are scored
    mia_folds: int = 5  # cross-validation folds of the membership-inference attack
    # Extra members trained (and unlearned) with the ensemble for the lira evaluator's
    # reference models only: never part of a prediction
    shadow_members: int = 0
    # Baseline: one model trained the same way on its own sample ("none" to skip)
    baseline: str = "resnet152"
    baseline_plan: str = "bootstrap"  # bootstrap (the original), subset, full (the working set)
    baseline_fraction: float = 0.2
    baseline_epochs: int = 0  # epochs per phase of the baseline (0: as `epochs`)
    # none (the original: the baseline keeps what it saw), oracle (retrained without the
    # deleted ids); auto: oracle when the strategy is the oracle itself, else none
    baseline_unlearning: str = "auto"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# The fast nets' recipe (one air-s: 85.6% on CIFAR-10 in 5 epochs, 7 minutes on 2 CPU cores;
# docs/configuration.md, Models).
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


def epochs_of(cfg: Config, source: str) -> int:
    """Epochs per phase of a model group: ``baseline_epochs`` for the baseline when set (to
    match its training compute to the ensemble's), else ``epochs``."""
    return cfg.baseline_epochs if source == "baseline" and cfg.baseline_epochs else cfg.epochs


def _coerce(field: dataclasses.Field, text: str):
    kind = typing.get_type_hints(Config)[field.name]
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
        raise ConfigError(f"{field.name} takes {noun}, got {text!r}") from None


def apply_overrides(config: Config, overrides: list[str] | dict) -> Config:
    """Applies ``["key=value", ...]`` (or a dict) to a config, with typed parsing."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides]
    changes = {}
    for key, value in items:
        if key not in fields:
            raise ConfigError(f"unknown setting {key!r}; settings are: {', '.join(sorted(fields))}")
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
