"""The records of ``results.json``, typed: the one declaration its writers (the driver,
unlearning, the pretraining, the run's header) and its readers (``report``, the plots, the CLI,
``forget``'s checks, ``audit``) share.

A record is a `typing.TypedDict`: the file stays plain JSON, a type checker checks the code
that builds or reads it, and `problems` checks a file against the declaration at run time (the
tests hold every run they make to it). Evaluators own their blocks' contents: a record that
holds them (`Results`, `PhaseRecord`, `RequestRecord`) has, besides its declared keys, one
`EvaluatorBlocks` per evaluator output (``forget``, ``retain``, ``test``, ``mia``, ...).
"""


import json
import pathlib
import types
import typing
from typing import Any, NotRequired, TypedDict

from jaxunlearn.config import is_a


class RecordError(ValueError):
    """A results file that is missing, unreadable, or not a run's results."""


EvaluatorBlocks = dict[str, dict[str, Any]]  # model name ("ensemble", "oracle", ...) -> block


class Versions(TypedDict):
    python: str
    jax: str
    flax: str
    optax: str


class Score(TypedDict):
    """A model's (or an aggregation's) test scores; ``members``: how many voted."""

    test_accuracy: float | None
    test_loss: float | None  # None for a vote
    members: NotRequired[int]


class MemberScore(TypedDict):
    member: int
    test_accuracy: float
    test_loss: float
    valid: bool  # its lineage holds no id deleted at this point
    born: int  # the phase its current training began
    shadow: NotRequired[bool]  # trained for evaluation only; never predicts
    # its own values of the settings given per member whose values differ (learning_rate, ...)
    settings: NotRequired[dict[str, float]]


class Work(TypedDict):
    """Training done (or that retraining would do): member-epochs, examples fed, seconds."""

    member_epochs: int
    member_examples: int
    seconds: float


class OracleWork(Work):
    reference_seconds: NotRequired[float]  # bringing the kept oracle reference up to date
    reference_from_scratch: NotRequired[bool]


class BaselineDeletionCost(Work):
    unlearning: str  # the baseline's unlearning strategy
    invalidated: bool
    oracle: Work


class DeletionCost(Work):
    """What one deletion cost the ensemble, against retraining it from scratch (``oracle``)."""

    strategy: str
    ids: int
    invalidated_observed: int
    invalidated_expected: float
    compile_seconds: float
    oracle: OracleWork
    speedup_vs_oracle: float | None
    speedup_vs_oracle_seconds: float | None
    baseline: NotRequired[BaselineDeletionCost]
    rewound_to: NotRequired[dict[str, int]]  # rewind: member -> the stage it went back to


class SetScore(TypedDict):
    """A model's accuracy and loss on a set of examples (the ``scores`` evaluator's blocks)."""

    accuracy: float | None
    loss: float | None
    n: int


class AfterUnlearning(TypedDict):
    ensemble: Score
    members: NotRequired[list[MemberScore]]  # when members were retrained
    baseline: NotRequired[SetScore]  # on the test set, when the baseline unlearns


class PhaseRecord(TypedDict):
    """One phase: its training, scores, and the deletion scheduled after it (if any)."""

    phase: int
    working_set: int
    seconds_by_model: dict[str, float]  # "ensemble", "baseline", "unlearning", "evaluation"
    sample_size: int
    ensemble: Score
    aggregations: dict[str, Score]
    baseline: Score | None
    deleted_ids: list[int]
    invalidated: list[int]
    members: list[MemberScore]
    seconds: float
    cost: NotRequired[DeletionCost]
    after_unlearning: NotRequired[AfterUnlearning]


class RequestRecord(TypedDict):
    """A deletion request (`jaxunlearn forget`, or a re-applied one) applied by the run."""

    request: int | None
    phase: int
    ids: list[int]
    source: str  # where the request came from (`jaxunlearn.deletion_queue`)
    invalidated: list[int]
    together: NotRequired[list[int]]  # the requests applied in this one deletion
    cost: NotRequired[DeletionCost]
    after_unlearning: NotRequired[AfterUnlearning]


class Final(TypedDict):
    phase: int
    deleted_ids: list[int]
    invalidated: list[int]
    seconds: float
    ensemble: Score
    members: list[MemberScore]
    baseline: Score | None


class BaselineCost(Work):
    unlearning: str
    # member_examples, seconds of retraining it at each deletion (absent in results written
    # before it was recorded)
    retraining: NotRequired[dict[str, float]]


class RunCost(Work):
    """The deletions' cost summed over the run, against the oracle's."""

    strategy: str
    events: int
    ids: int
    invalidated_observed: int
    invalidated_expected: float
    oracle: Work
    oracle_final_seconds: float | None
    speedup_vs_oracle: float | None
    speedup_vs_oracle_seconds: float | None
    training: Work  # the run's own phase training
    baseline: NotRequired[BaselineCost]


class Audit(TypedDict):
    """The lineage audit of the end state."""

    ok: bool
    exact: bool
    violations: int
    held_by_design: int
    members: int
    deleted: int
    snapshots: NotRequired[int]
    snapshot_violations: NotRequired[int]


class Pretrain(TypedDict):
    ids: list[int]  # first and last never-deletable id
    examples: int
    epochs: int
    batch_size: int
    learning_rate: float
    seconds: float
    member_examples: int
    test_accuracy: float
    fingerprint: str


class Error(TypedDict):
    kind: str  # "diverged"
    group: str
    members: list[int]
    phase: int
    epoch: int
    step: int
    message: str


class DataSpec(TypedDict):
    """A run's data besides its examples (`jaxunlearn.data.Dataset.spec`): recorded unless it
    is CIFAR-10's (`jaxunlearn.data.CIFAR10_SPEC`), which its absence means."""

    classes: int
    input_shape: list[int]
    dtype: str
    mean: list[float]
    std: list[float]


class Header(TypedDict):
    """What a run records when it starts: its data, machine and versions."""

    data_source: str
    n_train: int
    n_test: int
    member_parallel: str  # the layout resolved
    device: str
    backend: str
    devices: int
    processes: int
    versions: Versions
    data_fingerprint: str
    data: NotRequired[DataSpec]


class Results(Header):
    """``results.json``: the header, each phase, requests, and (once ``complete``) the end."""

    complete: bool
    config: dict[str, Any]  # `jaxunlearn.config.Config.to_dict`
    phases: list[PhaseRecord]
    pretrain: NotRequired[Pretrain]
    requests: NotRequired[list[RequestRecord]]
    error: NotRequired[Error]
    final: NotRequired[Final]
    cost: NotRequired[RunCost]
    deleted_ids: NotRequired[list[int]]
    replacements: NotRequired[int]
    lineage_audit: NotRequired[Audit]
    baseline_deleted_ids_in_lineage: NotRequired[int | None]
    compile_seconds: NotRequired[float]
    wall_seconds: NotRequired[float]


# The records that hold, besides their own keys, evaluators' blocks.
_WITH_BLOCKS = (Results, PhaseRecord, RequestRecord)


def load(path) -> Results:
    """The results in ``path`` (a ``results.json``); `RecordError` when it is missing or not
    a run's results."""
    path = pathlib.Path(path)
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise RecordError(f"{path} does not exist: not a run folder, or the run has not "
                          f"started") from None
    except (OSError, ValueError) as e:
        raise RecordError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(results, dict) or "phases" not in results:
        raise RecordError(f"{path} is not a run's results (no phases)")
    return results


def problems(value: Any, kind: Any = Results, where: str = "results") -> list[str]:
    """Where ``value`` differs from the record type ``kind``: a missing or undeclared key, or
    a value of another type (``[]`` when it conforms)."""
    if kind is Any:
        return []
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        found = [problems(value, a, where) for a in args]
        return [] if any(not p for p in found) else min(found, key=len)
    if kind is type(None):
        return [] if value is None else [f"{where}: {value!r} is not null"]
    if typing.is_typeddict(kind):
        return _record_problems(value, kind, where)
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{where}: {type(value).__name__}, not an object"]
        return [p for k, v in value.items() for p in problems(v, args[1], f"{where}.{k}")]
    if origin is list:
        if not isinstance(value, list):
            return [f"{where}: {type(value).__name__}, not a list"]
        return [p for i, v in enumerate(value) for p in problems(v, args[0], f"{where}[{i}]")]
    return [] if is_a(value, kind) else [f"{where}: {value!r} is not {kind.__name__}"]


def _record_problems(value: Any, kind: type, where: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where}: {type(value).__name__}, not a {kind.__name__} object"]
    hints = typing.get_type_hints(kind)
    out = [f"{where}: no {key!r} ({kind.__name__})"
           for key in sorted(kind.__required_keys__ - value.keys())]
    for key, item in value.items():
        if key in hints:
            out += problems(item, hints[key], f"{where}.{key}")
        elif kind in _WITH_BLOCKS:
            out += problems(item, EvaluatorBlocks, f"{where}.{key}")
        else:
            out.append(f"{where}: {key!r} is not a field of {kind.__name__}")
    return out
