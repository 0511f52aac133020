"""Run configuration: one frozen dataclass, named presets, ``key=value`` overrides.

Presets:

* ``smoke``: tiny nets on 300 examples of the bundled sample, 3 phases, 1 epoch. Seconds; the
  tests run it end to end.
* ``demo`` (the default): the original protocol's shape (5 phases, 5 ResNet-18s with the ImageNet
  stem, 20% bootstrap per member per phase, ten deletions, a ResNet-152 baseline) on the first
  500 training and 300 test images of the bundled sample, 3 epochs per phase, batch 50,
  evaluation after each phase. A few minutes on two CPU cores (a ResNet-152 trains at about
  9 images/s there, which sets the size).
* ``seed``: the original protocol at full scale on full CIFAR-10 (50 epochs, Adam 1e-3, batch
  512, deletions of ``int(1e-4 * |working set|)`` ids after phases 1-4, evaluation after every
  epoch), with the original's defects fixed (cumulative lineage, the baseline's BatchNorm in
  training mode, true mean cross-entropy). GPU recommended.
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
    member_parallel: str = "auto"  # auto, vmap, map, hybrid:K (vmap groups of K, map over groups)
    precision: str = "fp32"  # fp32, or bf16 compute with fp32 parameters and optimizer state
    devices: int = 1  # shard the member axis over N devices with shard_map (0: all, 1: none)
    aggregation: str = "mean_logits"  # mean_logits, mean_probs, vote
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
    reset_optimizer_each_phase: bool = True
    augment: bool = False
    eval_every_epoch: bool = True
    # Checkpoints (orbax, in the run folder): after every phase, and every N steps when N > 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2  # the newest K complete checkpoints are kept
    # Deletions and unlearning
    deletion_rate: float = 1e-4  # random schedule: int(rate * |working set|) ids after phases 1..P-1
    deletions: str = ""  # path of an explicit JSON schedule (replaces the random one)
    strategy: str = "replace"  # replace, rewind (to the last clean state), oracle (from scratch)
    oracle_reference: str = "end"  # none, end, deletions: when to train the oracle for comparison
    # Evaluation of unlearning
    retain_eval: int = 10000  # at most this many retained training examples are scored
    mia_folds: int = 5  # cross-validation folds of the membership-inference attack
    # Baseline: one model trained the same way on its own sample ("none" to skip)
    baseline: str = "resnet152"
    baseline_plan: str = "bootstrap"  # bootstrap (the original), full (the whole working set)
    baseline_fraction: float = 0.2
    baseline_unlearning: str = "auto"  # none (the original), oracle; auto: oracle iff strategy is

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


PRESETS: dict[str, Config] = {
    "smoke": Config(preset="smoke", train_limit=300, test_limit=100, members=3, model="tiny",
                    phases=3, epochs=1, batch_size=16, eval_batch_size=100, deletion_rate=0.01,
                    baseline="tiny"),
    "demo": Config(preset="demo", train_limit=500, test_limit=300, epochs=3, batch_size=50,
                   eval_batch_size=300, eval_every_epoch=False, deletion_rate=0.01),
    "seed": Config(preset="seed", data="cifar10"),
}
PRESET_HELP = {
    "smoke": "tiny nets, 300 sample images, 3 phases, 1 epoch: seconds (tests)",
    "demo": "5 ResNet-18s vs a ResNet-152 on the bundled 1,000-image sample, 5 phases: minutes on a CPU",
    "seed": "the original protocol on full CIFAR-10 (50 epochs/phase, batch 512): GPU recommended",
}


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


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]
