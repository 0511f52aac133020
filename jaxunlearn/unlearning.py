"""Unlearning a deletion, and the run's end state, with what they are scored and cost.

`delete` scores the ensemble before, marks the ids deleted, unlearns them with the ensemble's
strategy (and the baseline's), brings the oracle reference up to date where the config asks
for it, scores everything after, and accounts the cost against the oracle's, in
member-examples and in seconds. `finish` writes the end state.

The oracle's seconds for a deletion are those the run's own training of the stages it would
retrain took (`jaxunlearn.stages.Stages.retrain_seconds`): measured in the same run, never
paid again. The reference model itself (``oracle_reference``) is trained from scratch once
(after the first deletion with ``deletions``, at the end of the phases with ``end``) and kept
up to date incrementally after that; a `forget` request updates it only with ``deletions``.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from jaxunlearn import durable, metrics, records, timing
from jaxunlearn.config import epochs_of
from jaxunlearn.deletion_queue import Request, Scheduled
from jaxunlearn.strategies.base import at_path


def member_records(logits, labels, valid, group) -> list[records.MemberScore]:
    """Each member's test scores, validity and birth phase (shadow members marked), and its own
    values of the settings given per member (`ModelGroup.settings`), when they differ."""
    return [dict(member=i, **metrics.score(logits[i], labels), valid=bool(valid[i]),
                 born=int(group.lineage.born[i]),
                 **({} if group.predicting[i] else {"shadow": True}),
                 **({"settings": {k: v[i] for k, v in group.settings.items()}}
                    if group.settings else {}))
            for i in range(logits.shape[0])]


def _reference(run, upto: int, train: bool):
    """The oracle reference at stage ``upto`` and what bringing it up to date cost: trained or
    updated when ``train``, else only if it is kept and current (None when there is none)."""
    ref, unit = run.state.reference, run.state.units["ensemble"]
    if not train:
        ref.follow(run.state.deletions.mask)  # drops it if it depends on a deleted id
        if ref.group is None or ref.upto != upto:
            return (unit.group, None, False) if run.strategy.reference else (None, None, False)
    return ref.get(run.context(unit), upto)


def delete(run, phase: int, ids: np.ndarray, invalid: np.ndarray, scheduled: bool,
           record: dict | None = None, honoured: Callable[[dict], None] | None = None) -> dict:
    """Deletes ``ids`` (none deleted yet) after ``phase``; ``invalid`` (bool ``[m]``) marks
    the ensemble members whose lineage holds one; ``scheduled``: the run's own deletion (else a
    request). Fills ``record`` (a new dict when None) with the deletion's blocks: the
    evaluators' (before and after unlearning, the oracle and the baseline), ``cost`` and
    ``after_unlearning``, and returns it. ``honoured(record)`` is called once the ids are
    unlearned, before anything is scored after (``record`` has the "before" blocks and
    ``cost``): a request can be made durable there, its scoring following."""
    record = {} if record is None else record
    cfg, unit, labels = run.cfg, run.state.units["ensemble"], run.test_labels
    ens = unit.group
    upto = run.state.stages.last(ens.track, phase)
    expected = run.state.stages.expected_invalidated(ens.track, ids, ens.lineage.born, upto)
    run.state.deletions.mark(ids)
    run.drop_saved_logits()
    run.state.report.results["complete"] = False  # the end state no longer describes the run
    # Before and after unlearning, the models are scored on the same sets.
    forget, retain = run.state.deletions.sorted_ids(), run.retain_ids(phase)
    before = run.evaluate([run.model("ensemble_before", ens)], forget, retain)

    t0, clock = time.perf_counter(), timing.Clock()
    with run.spans("unlearning"):
        unit.state, outcome = unit.strategy.unlearn(unit.state, run.context(unit), phase, ids,
                                                    invalid)
    run.state.ledger.replacements += outcome.replaced
    cost = {"strategy": unit.strategy.name, "ids": int(ids.size),
            "invalidated_observed": int(invalid.sum()), "invalidated_expected": expected,
            **outcome.cost.as_dict(), **outcome.details}
    cost["seconds"] = clock.seconds()
    cost["compile_seconds"] = time.perf_counter() - t0 - cost["seconds"]
    cost["oracle"] = {**run.state.stages.retrain_cost(ens.track, upto, run.state.deletions.mask,
                                                      cfg.epochs),
                      "seconds": run.state.stages.retrain_seconds(ens.track, upto)}
    if run.baseline is not None:
        cost["baseline"] = _unlearn_baseline(run, phase, ids)

    models = [run.model("ensemble", ens, outcome.live)]
    ref = cfg.oracle_reference
    train = ref == "deletions" or (ref == "end" and scheduled and phase == cfg.phases)
    oracle, measured, fresh = _reference(run, upto, train or run.strategy.reference)
    if measured is not None:
        cost["oracle"]["reference_seconds"] = measured.seconds
        cost["oracle"]["reference_from_scratch"] = fresh
    if oracle is not None:
        models.append(run.model("oracle", oracle))
    if run.baseline is not None:
        models.append(run.model("baseline", run.baseline))
    ran, spent = cost["member_examples"], cost["seconds"]
    cost["speedup_vs_oracle"] = cost["oracle"]["member_examples"] / ran if ran else None
    cost["speedup_vs_oracle_seconds"] = (cost["oracle"]["seconds"] / spent
                                         if ran and spent > 0 else None)
    run.state.ledger.events.append(cost)
    record.update({k: dict(v) for k, v in before.items()})
    record["cost"] = cost
    if honoured is not None:
        honoured(record)

    after = run.evaluate(models, forget, retain)
    for k, v in after.items():
        record.setdefault(k, {}).update(v)
    test = run.test_logits(ens, outcome.live)
    record["after_unlearning"] = {
        "ensemble": metrics.aggregate(test, labels, ens.voters(outcome.live), cfg.aggregation)}
    if outcome.retrained:
        record["after_unlearning"]["members"] = member_records(
            test, labels, np.ones(ens.members, bool), ens)
    if (run.baseline is not None and run.state.units["baseline"].strategy.unlearns
            and "test" in after):
        record["after_unlearning"]["baseline"] = after["test"]["baseline"]
    return record


def _unlearn_baseline(run, phase: int, ids: np.ndarray) -> dict:
    """The baseline's unlearning (by its strategy: oracle when asked, else none, as in the
    original study) and its cost."""
    unit = run.state.units["baseline"]
    invalid = unit.group.lineage.invalid(ids)
    upto = run.state.stages.last(unit.group.track, phase)
    cost = {"unlearning": unit.strategy.name, "invalidated": bool(invalid[0]),
            "member_epochs": 0, "member_examples": 0, "seconds": 0.0,
            "oracle": {**run.state.stages.retrain_cost(unit.group.track, upto,
                                                       run.state.deletions.mask,
                                                       epochs_of(run.cfg, "baseline")),
                       "seconds": run.state.stages.retrain_seconds(unit.group.track, upto)}}
    unit.state, outcome = unit.strategy.unlearn(unit.state, run.context(unit), phase, ids,
                                                invalid)
    cost.update(outcome.cost.as_dict())
    return cost


def finish(run) -> records.Results:
    """Writes the end state: ``final``, the evaluators' blocks against the oracle, the cost
    totals, the lineage audit, ``lineage.npz`` and the plot."""
    cfg, labels, results = run.cfg, run.test_labels, run.state.report.results
    ens, unit = run.ensemble, run.state.units["ensemble"]
    last = results["phases"][-1]
    final: records.Final = {k: last[k] for k in ("phase", "deleted_ids", "invalidated", "seconds")}
    test = run.test_logits(ens)  # the live state, after every deletion and request
    final["ensemble"] = metrics.aggregate(test, labels, ens.voters(), cfg.aggregation)
    final["members"] = member_records(test, labels, np.ones(ens.members, bool), ens)
    final["baseline"] = (metrics.score(run.test_logits(run.baseline)[0], labels)
                         if run.baseline else None)
    upto = run.state.stages.last(ens.track, cfg.phases)
    forget = run.state.deletions.sorted_ids()
    models = [run.model("ensemble", ens)]
    oracle_seconds = None
    if forget.size and (cfg.oracle_reference != "none" or run.strategy.reference):
        # Trained at the end of the phases; later (after a `forget`) only kept, if still exact.
        train = cfg.oracle_reference == "deletions" or not run.state.reference.trained
        oracle, measured, _ = _reference(run, upto, train or run.strategy.reference)
        if oracle is not None:
            models.append(run.model("oracle", oracle))
        oracle_seconds = measured.seconds if measured is not None else None
    if run.baseline is not None:
        models.append(run.model("baseline", run.baseline))
    blocks = run.evaluate(models, forget, run.retain_ids(cfg.phases))
    for evaluator in run.evaluators:
        befores = [p[evaluator.name]["ensemble_before"]
                   for p in results["phases"] + results.get("requests", [])
                   if "ensemble_before" in p.get(evaluator.name, {})]
        if evaluator.carry_before and befores:
            blocks[evaluator.name]["ensemble_before_last_deletion"] = befores[-1]
    violations = ens.lineage.violations(run.state.deletions.ids)
    held = unit.strategy.lineage_paths(unit.state)
    held_violations = sum(int(at_path(unit.state, path)[:, forget].sum())
                          for path in held.values())
    results.update({
        "complete": True,
        "final": final,
        **blocks,
        "cost": run.state.ledger.totals(unit.strategy.name, oracle_seconds,
                                        run.state.units["baseline"].strategy.name
                                        if run.baseline else None),
        "deleted_ids": sorted(run.state.deletions.ids),
        "replacements": run.state.ledger.replacements,
        # An approximate strategy keeps deleted ids in live lineage by design: counted, and
        # said, but not a violation (its kept checkpoints are purged all the same).
        "lineage_audit": {"ok": (violations == 0 or not unit.strategy.exact)
                          and held_violations == 0, "exact": unit.strategy.exact,
                          "violations": violations if unit.strategy.exact else 0,
                          "held_by_design": 0 if unit.strategy.exact else violations,
                          "members": ens.members,
                          "deleted": len(run.state.deletions.ids),
                          **({"snapshots": len(held), "snapshot_violations": held_violations}
                             if held else {})},
        # The baseline is a reference model, as in the original study: it never trains on a
        # deleted id after its deletion but is not unlearned (unless baseline_unlearning is
        # oracle); this counts what it holds.
        "baseline_deleted_ids_in_lineage": (run.baseline.lineage.violations(run.state.deletions.ids)
                                            if run.baseline else None),
        "compile_seconds": timing.compile_seconds(),
        "wall_seconds": run.elapsed(),
    })
    if run.primary:
        ens.lineage.save(run.disk.folder.lineage, run.state.deletions.ids)
        run.state.report.save()
        run.state.report.plot()
    return results


def apply(run, phase: int, request: Request | list[Request],
          durable_first: bool = False) -> dict:
    """Applies a request (or several together: one deletion of all their ids) after
    ``phase``: its ids not deleted yet are invalidated, unlearned with the run's strategy and
    scored. A scheduled deletion returns its blocks for the phase's record; any other goes into
    ``results["requests"]`` (one record, listing every request applied in it). ``durable_first``:
    the deletion is made durable (`durable.commit`: checkpoint, purge, the log's outcomes) as
    soon as its ids are unlearned, and scored after that; ``run.marks["honoured"]`` says when."""
    together = request if isinstance(request, list) else [request]
    first = together[0]
    ids = np.setdiff1d(np.concatenate([r.ids for r in together]),
                       run.state.deletions.ids).astype(np.int64)
    invalid = run.ensemble.lineage.invalid(ids)
    scheduled = isinstance(first.source, Scheduled)
    record = {} if scheduled else {
        "request": first.id, "phase": phase, "ids": ids.tolist(),
        "source": str(first.source), "invalidated": np.flatnonzero(invalid).tolist(),
        **({"together": [r.id for r in together]} if len(together) > 1 else {})}

    def honoured(record: dict) -> None:
        cost = record.get("cost", {})
        for r in together:
            if r.key is None:
                continue
            others = [o.id for o in together if o is not r]
            run.state.deletions.applied[r.key] = {
                "invalidated": np.flatnonzero(invalid).tolist(),
                "cost": {k: cost.get(k) for k in ("member_epochs", "member_examples", "seconds")},
                "message": "; ".join(
                    ([] if np.setdiff1d(r.ids, ids).size < len(r.ids) else
                     ["nothing left to delete: already deleted"])
                    + ([f"applied in one deletion with request(s) {others}"] if others else []))}
        if not scheduled:
            run.state.report.results.setdefault("requests", []).append(record)
        if durable_first:
            durable.commit(run)
            run.marks["honoured"] = time.perf_counter()

    if ids.size:
        return delete(run, phase, ids, invalid, scheduled, record, honoured)
    honoured(record)
    return record
