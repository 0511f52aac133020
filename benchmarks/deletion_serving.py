"""Serving deletion requests on a trained run: what one single-id `forget` costs, and where it
goes.

Copies a finished run (``RUN_DIR`` is never changed) and serves ``--requests`` single-id
requests for random ids of its training set (``--seed``), one after another, each a whole
`jaxunlearn.forgetting.forget`: the request checked and logged, the run reopened from its newest
checkpoint, the ids unlearned with the run's strategy, scored, checkpointed, older checkpoints
purged. By default the requests are served by this process (a long-lived server: data loaded
once, each request reopens the run from disk); with ``--cli`` each is a fresh ``jaxunlearn
forget`` process, so its time includes starting Python and JAX (``start``: the process's wall
time beyond what `forget` measured itself).

With ``--together K`` the requests come K at a time: K - 1 logged first (as requests that
arrive while the run is busy), then a `forget` that applies the K pending requests as one
deletion (one replay of the members they invalidate); a row is then a batch, and the summary
gives its seconds per request as well.

Per request: wall seconds split into ``open`` (checks, data, restore), ``retraining``,
``compile``, ``scoring``, ``checkpoint`` (writes, purge, log, results), ``other``; members
invalidated and member-examples retrained; the ensemble's test accuracy after. Summary: median
and p90 of each, and the speed-up against retraining from scratch: the run's own measured
training seconds of the whole model (every group it trains, all phases: what honouring a
request without unlearning costs).

    python benchmarks/deletion_serving.py runs/air-s-shards-... --requests 5 --seed 0 \\
        --out benchmarks/results/cpu_deletion_serving.json

Prints a table; ``--out`` writes JSON with the command, date, versions and every request.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import benchlib

from jaxunlearn import records

PARTS = ("open", "retraining", "compile", "scoring", "checkpoint", "other")
# honoured: until the request was durable (unlearned, checkpointed, purged, logged), before the
# scoring that follows it in the same call


def training_seconds(results: dict) -> float:
    """Seconds the run spent training its models from scratch (every group, every phase, a
    pretrained initialisation's training included; compilation and scoring left out)."""
    return results.get("pretrain", {}).get("seconds", 0.0) + sum(
        v for phase in results["phases"] for k, v in phase.get("seconds_by_model", {}).items()
        if k not in ("unlearning", "evaluation"))


def pick_ids(results: dict, n: int, seed: int) -> list[int]:
    """``n`` random ids a request may name: not deleted, not declared never deletable."""
    deletable = results["n_train"] - results["config"].get("pretrain", 0)
    pool = np.setdiff1d(np.arange(deletable), results["deleted_ids"])
    return np.random.default_rng(seed).choice(pool, n, replace=False).tolist()


def serve_in_process(run_dir: pathlib.Path, ids: list[int], data: str | None,
                     together: int = 1):
    """Each batch of ``together`` ids: all but the last logged as requests first (as if they
    arrived while the run was busy), then a `forget` of the last, which applies them all as
    one deletion."""
    from jaxunlearn import cache, data as data_lib, deletion_log, forgetting
    from jaxunlearn.run import saved_config

    cache.use_compilation_cache()
    cfg = saved_config(run_dir)
    dataset = data_lib.load_dataset(data or cfg.data)
    for start in range(0, len(ids), together):
        batch = ids[start:start + together]
        t0 = time.perf_counter()
        with deletion_log.DeletionLog.open(run_dir) as log:
            for i in batch[:-1]:
                log.request([i], str(forgetting.Forget()))
        outcome = forgetting.forget(run_dir, batch[-1:], log=lambda s: None, dataset=dataset)
        wall = time.perf_counter() - t0
        yield batch, outcome, {**outcome["timing"], "start": 0.0, "wall": wall}


def serve_cli(run_dir: pathlib.Path, ids: list[int], data: str | None):
    for i in ids:
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "jaxunlearn.cli", "forget", str(run_dir),
                               "--ids", str(i)], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode:
            raise SystemExit(f"forget --ids {i} failed:\n{done.stdout}{done.stderr}")
        results = records.load(run_dir / "results.json")
        record = results["requests"][-1]
        timing = parse_timing(done.stdout)
        yield [i], {"record": record, "results": results}, {
            **timing, "start": wall - timing["total"], "wall": wall}


def parse_timing(stdout: str) -> dict:
    """The timing line `jaxunlearn forget` prints: ``request N durable after Hs (then
    scored); took Ts: Xs open, ...``."""
    for line in stdout.splitlines():
        match = re.match(r"request \d+ durable after ([\d.]+)s \(then scored\); took ([\d.]+)s: "
                         r"(.*)$", line)
        if match:
            out = {"honoured": float(match.group(1)), "total": float(match.group(2))}
            for part in match.group(3).split(", "):
                value, name = part.split(" ", 1)
                if name == "rows scored":
                    out["scored_rows"] = int(value)
                else:
                    out[name] = float(value.rstrip("s"))
            return out
    raise SystemExit(f"no timing line in the output of forget:\n{stdout}")


def row(ids: list[int], outcome: dict, timing: dict) -> dict:
    record = outcome["record"] or {}
    cost = record.get("cost") or {}
    final = outcome["results"]["final"]["ensemble"]
    return {"ids": ids, "invalidated": record.get("invalidated", []),
            "member_examples": cost.get("member_examples", 0),
            "member_epochs": cost.get("member_epochs", 0),
            "test_accuracy": final["test_accuracy"], "seconds": timing}


def summarise(rows: list[dict], scratch: float) -> dict:
    def stats(values):
        values = sorted(values)
        return {"median": statistics.median(values),
                "p90": float(np.percentile(values, 90)), "max": values[-1]}

    out = {k: stats([r["seconds"][k] for r in rows])
           for k in ("wall", "start", "honoured", *PARTS)}
    out["overhead"] = stats([r["seconds"]["wall"] - r["seconds"]["retraining"] for r in rows])
    # what it took to honour a request beyond retraining (start and restore, compile, checkpoint)
    out["overhead_to_honour"] = stats([r["seconds"]["start"] + r["seconds"]["honoured"]
                                       - r["seconds"]["retraining"] for r in rows])
    out["scored_rows"] = stats([r["seconds"]["scored_rows"] for r in rows])
    out["member_examples"] = stats([r["member_examples"] for r in rows])
    out["invalidated"] = stats([len(r["invalidated"]) for r in rows])
    out["per_request"] = stats([r["seconds"]["wall"] / len(r["ids"]) for r in rows])
    out["training_from_scratch_s"] = scratch
    out["speedup_vs_scratch_median"] = scratch / out["wall"]["median"]
    out["fraction_of_scratch_median"] = out["wall"]["median"] / scratch
    out["test_accuracy_after"] = rows[-1]["test_accuracy"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=pathlib.Path, help="a finished run (not changed)")
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cli", action="store_true",
                        help="each request a fresh `jaxunlearn forget` process")
    parser.add_argument("--together", type=int, default=1, metavar="K",
                        help="apply the requests K at a time, as one deletion (in process)")
    parser.add_argument("--data", help="the run's data, where its config's does not find it")
    parser.add_argument("--work", type=pathlib.Path,
                        help="where to copy the run (default: a temporary folder, removed)")
    parser.add_argument("--out", help="JSON file for the results")
    args = parser.parse_args(argv)

    results = records.load(args.run_dir / "results.json")
    if not results.get("complete"):
        parser.error(f"{args.run_dir} is not a finished run (results.json is not complete)")
    scratch = training_seconds(results)
    ids = pick_ids(results, args.requests, args.seed)
    tmp = None
    if args.work is None:
        tmp = tempfile.mkdtemp(prefix="deletion-serving-")
        args.work = pathlib.Path(tmp)
    copy = args.work / args.run_dir.name
    shutil.copytree(args.run_dir, copy, ignore=shutil.ignore_patterns(".lock"))
    if args.together > 1 and args.cli:
        parser.error("--together serves in process; drop --cli")
    serve = (serve_cli if args.cli else
             lambda *a: serve_in_process(*a, together=args.together))
    rows = []
    print(f"serving {len(ids)} requests on a copy of {args.run_dir} "
          f"({'a process each' if args.cli else 'in process'}); training from scratch took "
          f"{scratch:.1f}s")
    header = ["ids", "invalidated", "member-examples", "wall s", "honoured", "start", *PARTS,
              "scored rows", "test acc"]
    print(" | ".join(header))
    try:
        for batch, outcome, timing in serve(copy, ids, args.data):
            rows.append(row(batch, outcome, timing))
            r = rows[-1]
            print(" | ".join([",".join(map(str, batch)), str(r["invalidated"]), str(r["member_examples"]),
                              f"{timing['wall']:.1f}", f"{timing['honoured']:.1f}",
                              f"{timing['start']:.1f}", *(f"{timing[k]:.1f}" for k in PARTS),
                              str(timing.get("scored_rows", "")),
                              f"{r['test_accuracy']:.4f}"]), flush=True)
        from jaxunlearn.auditing import audit

        ok, _, verdict = audit(copy)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    summary = summarise(rows, scratch)
    summary["audit_ok"], summary["audit"] = ok, verdict
    print(f"median {summary['wall']['median']:.1f}s per request (p90 "
          f"{summary['wall']['p90']:.1f}s), durable after {summary['honoured']['median']:.1f}s; "
          f"overhead {summary['overhead']['median']:.1f}s, to honour "
          f"{summary['overhead_to_honour']['median']:.1f}s; "
          f"training from scratch {scratch:.1f}s: {summary['speedup_vs_scratch_median']:.1f}x; "
          f"audit: {verdict}")
    if args.out:
        benchlib.write_record(args.out, {
            "command": benchlib.command_line("deletion_serving.py", argv or sys.argv[1:]),
            "date": benchlib.utc_now(), "versions": benchlib.versions(),
            "run": str(args.run_dir), "config": results["config"], "mode":
            "cli" if args.cli else "in_process", "together": args.together, "rows": rows,
            "summary": summary})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
