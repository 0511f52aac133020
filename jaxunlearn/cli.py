"""Command line: ``jaxunlearn run | forget | fork | audit | log | predict | report | presets |
data``."""

from __future__ import annotations

import argparse
import functools
import datetime
import pathlib
import sys

from jaxunlearn import config as config_lib, files

EPILOG = """examples:
  jaxunlearn run                              # the demo preset on the bundled sample
  jaxunlearn run --preset smoke --out /tmp/runs
  jaxunlearn run --preset seed --data ~/data/cifar-10-batches-bin
  jaxunlearn run --preset demo epochs=2 members=3 --deletions deletions.json
  jaxunlearn run --preset seed devices=0 members=8         # members sharded over all GPUs
  jaxunlearn data --download                  # CIFAR-10 into ~/.cache/jaxunlearn, once
  jaxunlearn data --data ~/data/cifar-10-python.tar.gz
  jaxunlearn run --resume runs/demo-20261127-101500-seed0  # continue a killed run
  jaxunlearn forget runs/demo-20261127-101500-seed0 --ids 12,345
  jaxunlearn audit runs/demo-20261127-101500-seed0
  jaxunlearn log runs/demo-20261127-101500-seed0
  jaxunlearn predict runs/demo-20261127-101500-seed0 --inputs images.npy --out probs.npy
  jaxunlearn run --plugin mystrategies --preset smoke strategy=gradascent ascent_weight=2
"""

PLUGIN_HELP = ("import MODULE first (may repeat): its strategies, evaluators, models and "
               "datasets register themselves and their settings; a run records the ones it "
               "uses, and forget, audit, report, fork and run --resume import them again")


# Exit statuses besides 0 (ok) and 1 (an audit violation).
BAD_INPUT, DIVERGED, QUEUED, RESOURCE = 2, 3, 4, 5


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"a number of seconds >= 0, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxunlearn", description="Exact machine unlearning with vectorized ensembles.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="train an ensemble in phases, delete, unlearn, report",
                         description="Train an ensemble and a baseline chunk by chunk, apply "
                                     "deletions, unlearn exactly, and write a new run folder.")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                     help="override any setting of the preset (see `jaxunlearn presets -v`)")
    run.add_argument("--preset", default="demo", choices=sorted(config_lib.PRESETS),
                     help="starting configuration (default: demo)")
    run.add_argument("--out", default="runs", metavar="DIR",
                     help="parent folder of run folders; each run gets a new one (default: runs)")
    run.add_argument("--seed", type=int, help="random seed (default: the preset's, 0)")
    run.add_argument("--data", metavar="PATH",
                     help="the data: a cifar-10-batches-bin or cifar-10-batches-py folder, "
                          "their .tar.gz archive, a folder holding one, 'tfds[:DIR]', 'sample', "
                          "an .npz file (train_images, train_labels, test_images, test_labels) "
                          "or a registered name")
    run.add_argument("--deletions", metavar="FILE",
                     help='JSON schedule {"PHASE": [ids...]} applied after each phase '
                          "(replaces the random schedule)")
    run.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                     help="same as a positional override; may repeat")
    run.add_argument("--quiet", action="store_true", help="print only the run folder at the end")
    run.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="MODULE",
                     help=PLUGIN_HELP)
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue a stopped or killed run from its newest complete checkpoint "
                          "(KEY=VALUE overrides need --allow-config-change); on a finished run, "
                          "apply its queued deletion requests")
    run.add_argument("--allow-config-change", action="store_true",
                     help="with --resume: accept overrides of settings that may change mid-run "
                          "(learning_rate, epochs, data, checkpoint_every, ...)")
    multi = run.add_argument_group(
        "several hosts", "every process runs the same command; the member axis is sharded over "
                         "all their devices with devices=0; process 0 writes the run folder")
    multi.add_argument("--distributed", action="store_true",
                       help="call jax.distributed.initialize() (implied by --coordinator); "
                            "without the flags below, the cluster environment (e.g. SLURM) "
                            "supplies the address, process count and id")
    multi.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    multi.add_argument("--num-processes", type=int, metavar="N")
    multi.add_argument("--process-id", type=int, metavar="I")

    forget = sub.add_parser("forget", help="delete examples from a run: unlearn, checkpoint, "
                                           "purge, log",
                            description="Record a deletion request in the run's log and apply "
                                        "it: invalidate, retrain with the run's strategy, write a "
                                        "checkpoint, purge checkpoints that hold the ids, update "
                                        "results.json. A run in progress applies it after its "
                                        "current phase.")
    forget.add_argument("run_dir", metavar="RUN_DIR")
    forget.add_argument("--ids", help="example ids, e.g. 12,345,7")
    forget.add_argument("--ids-file", metavar="FILE", help="a file of ids (commas, spaces or "
                                                            "lines)")
    forget.add_argument("--wait", type=_seconds, default=600.0, metavar="SECONDS",
                        help="how long to wait for the run when another process holds it and "
                             "does not take the request (default 600)")
    fork = sub.add_parser("fork", help="copy a run that has deleted nothing, to unlearn it "
                                       "another way (e.g. strategy=finetune)",
                          description="Copy a run folder before its first deletion into a new "
                                      "folder with other unlearning settings (strategy, "
                                      "unlearn_epochs, unlearn_lr, ...); the trained models are "
                                      "the same bits. Then `forget` the same ids in each copy and "
                                      "compare them with `report`.")
    fork.add_argument("run_dir", metavar="RUN_DIR")
    fork.add_argument("new_dir", metavar="NEW_DIR")
    fork.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    fork.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="MODULE",
                      help=PLUGIN_HELP)
    audit = sub.add_parser("audit", help="check that no live state or kept checkpoint holds a "
                                         "deleted id")
    audit.add_argument("run_dir", metavar="RUN_DIR")
    log = sub.add_parser("log", help="print the run's deletion log")
    log.add_argument("run_dir", metavar="RUN_DIR")
    predict = sub.add_parser("predict", help="class probabilities of a trained run on new "
                                             "inputs (.npy in, .npy out)",
                             description="Load the run's newest checkpoint read-only (no lock) "
                                         "and write the ensemble's probabilities [n, classes] "
                                         "on the inputs, with the run's aggregation and TTA.")
    predict.add_argument("run_dir", metavar="RUN_DIR")
    predict.add_argument("--inputs", required=True, metavar="FILE.npy",
                         help="inputs shaped and typed like the run's training data (CIFAR-10: "
                              "uint8 [n, 32, 32, 3])")
    predict.add_argument("--out", required=True, metavar="PROBS.npy",
                         help="where to write the float32 probabilities")
    predict.add_argument("--per-member", action="store_true",
                         help="each member's probabilities [members, n, classes] instead")
    predict.add_argument("--group", default="ensemble", choices=("ensemble", "baseline"))

    presets = sub.add_parser("presets", help="list the presets")
    presets.add_argument("-v", "--verbose", action="store_true", help="show every setting")
    presets.add_argument("--plugin", dest="plugins", action="append", default=[],
                         metavar="MODULE", help="import MODULE first: -v lists its settings too")

    data = sub.add_parser("data", help="download CIFAR-10, or say which source is found, its "
                                       "counts and balance")
    data.add_argument("--data", metavar="PATH", help="source to inspect (default: auto search)")
    data.add_argument("--download", action="store_true",
                      help="fetch the official CIFAR-10 binary archive, check its published MD5 "
                           "and unpack it into the user cache (once; later calls reuse it)")
    data.add_argument("--dir", metavar="DIR", help="with --download: where to put it (default: "
                                                   "$JAXUNLEARN_CACHE/cifar10, else "
                                                   "~/.cache/jaxunlearn/cifar10)")
    report = sub.add_parser("report", help="compare finished runs: the field's table of "
                                           "unlearning methods (Markdown, CSV, plot)",
                            description="One row per run (its strategy) and the oracle: forget, "
                                        "retain and test accuracy, population and per-example "
                                        "(LiRA) membership inference, unlearning seconds, and "
                                        "the average gap to the oracle. The runs must share "
                                        "data, preset and training settings; one needs an "
                                        "oracle (oracle_reference=end).")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", default="report", metavar="DIR",
                        help="where to write table.md, table.csv and gap_vs_seconds.png "
                             "(default: report)")
    return parser


def resolve_config(args) -> config_lib.Config:
    cfg = config_lib.get_preset(args.preset)
    changes = {}
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.data is not None:
        changes["data"] = args.data
    if args.deletions is not None:
        changes["deletions"] = str(pathlib.Path(args.deletions).resolve())
    cfg = config_lib.apply_overrides(cfg, list(args.overrides) + list(args.sets))
    cfg = config_lib.apply_overrides(cfg, changes)
    return cfg


def new_run_dir(parent, cfg: config_lib.Config) -> pathlib.Path:
    """A run folder name that does not exist yet: ``PRESET-YYYYmmdd-HHMMSS-seedN[-k]``."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = pathlib.Path(parent) / f"{cfg.preset}-{stamp}-seed{cfg.seed}"
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


def init_distributed(args) -> None:
    """Joins a multi-process JAX run before anything touches a device."""
    import jax

    # CPU hosts gather results through gloo; accelerators use their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)


def cmd_run(args) -> int:
    from jaxunlearn import driver
    from jaxunlearn.results import summary_line

    log = (lambda s: None) if args.quiet else functools.partial(print, flush=True)
    if args.resume:
        if args.seed is not None or args.deletions is not None:
            raise config_lib.ConfigError("--seed and --deletions cannot change on --resume")
        overrides = list(args.overrides) + list(args.sets)
        if args.data is not None:
            overrides.append(f"data={args.data}")
        if args.distributed or args.coordinator:
            init_distributed(args)
        out = pathlib.Path(args.resume)
        results = driver.resume(out, overrides, args.allow_config_change, log=log)
    else:
        cfg = resolve_config(args)
        if args.distributed or args.coordinator:
            init_distributed(args)
        out = new_run_dir(args.out, cfg)
        if not args.quiet:
            print(f"jaxunlearn run: preset {cfg.preset}, seed {cfg.seed}, data {cfg.data} -> {out}")
        try:
            results = driver.train_and_evaluate(cfg, out, log=log)
        except Exception as e:
            # A new run that a resource stopped before it trained anything leaves no folder.
            if files.resource_problem(e) is not None and driver.discard_unstarted(out):
                e.add_note(f"The new run folder {out} held nothing trained: it was removed.")
            raise
    if not args.quiet:
        print(summary_line(results))
    print(out)
    return 0 if results["lineage_audit"]["ok"] else 1


def cmd_forget(args) -> int:
    from jaxunlearn import forgetting
    from jaxunlearn.results import summary_line

    ids = forgetting.parse_ids(args.ids, args.ids_file)
    outcome = forgetting.forget(args.run_dir, ids, log=functools.partial(print, flush=True),
                              wait=args.wait)
    if outcome["status"] == "taken":
        print(f"request {outcome['request']} recorded: {outcome['message']}")
        return 0
    if outcome["status"] == "queued":
        print(f"request {outcome['request']} recorded, not applied yet: {outcome['message']}")
        return QUEUED
    record = outcome["record"] or {}
    cost = record.get("cost", {})
    print(f"request {outcome['request']} applied: {len(record.get('ids', []))} id(s) deleted, "
          f"members invalidated {record.get('invalidated', [])}, retrained "
          f"{cost.get('member_epochs', 0)} member-epochs in {cost.get('seconds', 0.0):.1f}s")
    t = outcome["timing"]
    print(f"request {outcome['request']} durable after {t['honoured']:.1f}s (then scored); "
          f"took {t['total']:.1f}s: " + ", ".join(
        f"{t[k]:.1f}s {k}" for k in ("open", "retraining", "compile", "scoring", "checkpoint",
                                     "other")) + f", {t['scored_rows']} rows scored")
    print(summary_line(outcome["results"]))
    return 0


def cmd_fork(args) -> int:
    from jaxunlearn.driver import fork

    fork(args.run_dir, args.new_dir, args.overrides, log=functools.partial(print, flush=True))
    print(f"forked {args.run_dir} into {args.new_dir}"
          + (f" with {' '.join(args.overrides)}" if args.overrides else ""))
    return 0


def cmd_audit(args) -> int:
    from jaxunlearn.auditing import audit

    ok, lines, summary = audit(args.run_dir)
    for line in lines:
        print(line)
    print(summary)
    return 0 if ok else 1


def cmd_log(args) -> int:
    from jaxunlearn import forgetting

    print(forgetting.log_text(args.run_dir))
    return 0


def cmd_predict(args) -> int:
    import numpy as np

    from jaxunlearn.trained import PredictError, load

    try:
        inputs = np.load(args.inputs, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise PredictError(f"cannot read {args.inputs} as a .npy array ({e}); save the inputs "
                           f"with numpy.save") from None
    probs = load(args.run_dir).predict(inputs, per_member=args.per_member, group=args.group)
    out = pathlib.Path(args.out)
    files.atomic_write(out, lambda f: np.save(f, probs))
    print(f"wrote {out}: {' x '.join(map(str, probs.shape))} probabilities")
    return 0


def cmd_presets(args) -> int:
    width = max(map(len, config_lib.PRESETS))
    for name, cfg in config_lib.PRESETS.items():
        print(f"{name:{width}s}  {config_lib.PRESET_HELP[name]}")
        if args.verbose:
            for key, value in cfg.to_dict().items():
                shown = f"{key} = {value}"
                rule = config_lib.RULES[key]
                each = " (or one per member: a,b,...)" if rule.per_member else ""
                print(f"{'':{width}s}    {shown:40s} {rule.help}{each}")
    if args.verbose:  # the other plug-ins' settings: a config has them when it uses the plug-in
        others = {k: f for k, f in config_lib.declared().items()
                  if not config_lib.owner(k).startswith("jaxunlearn.")}
        if others:
            print("settings of plug-ins (in a run that uses the plug-in):")
        for key, field in others.items():
            shown = f"{key} = {field.default}"
            print(f"    {shown:40s} {config_lib.RULES[key].help} "
                  f"({config_lib.owner(key)})")
    return 0


def cmd_data(args) -> int:
    from jaxunlearn import data as data_lib

    if args.download:
        from jaxunlearn import download

        folder = download.download(args.dir, log=functools.partial(print, flush=True))
        if args.dir:
            print(f"use it with --data {folder}")
        else:
            print("`--data cifar10` (the seed preset's default) finds it from now on")
        return 0
    if args.dir:
        raise config_lib.ConfigError("--dir goes with --download")
    try:
        print(data_lib.describe(args.data))
    except data_lib.DataError as e:
        print(f"no data found:\n{e}", file=sys.stderr)
        return 1
    return 0


def cmd_report(args) -> int:
    from jaxunlearn import comparison

    rows = comparison.table(args.run_dirs)  # every check before anything is written
    paths = comparison.write(rows, args.out)
    print(comparison.markdown(rows), end="")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from jaxunlearn.data import DataError
    from jaxunlearn.deletions import ScheduleError

    from jaxunlearn.checkpoint import CheckpointError
    from jaxunlearn.deletion_log import DeletionLogError
    from jaxunlearn.forgetting import RequestError
    from jaxunlearn.runlock import NoRunFolder, RunLocked
    from jaxunlearn.comparison import ReportError
    from jaxunlearn.trained import PredictError

    commands = {"run": cmd_run, "forget": cmd_forget, "audit": cmd_audit, "log": cmd_log,
                "presets": cmd_presets, "data": cmd_data, "report": cmd_report,
                "fork": cmd_fork, "predict": cmd_predict}
    if args.command in ("run", "forget", "fork"):
        from jaxunlearn import cache

        cache.use_compilation_cache()
    try:
        if getattr(args, "plugins", None):
            from jaxunlearn import plugins

            plugins.import_modules(args.plugins)
        return commands[args.command](args)
    except Exception as e:
        resource = files.resource_problem(e)
        if resource is not None:
            print(f"jaxunlearn: error: {resource} ({_first_line(e)}). What was saved before "
                  f"is intact; free the resource and run the command again{_notes(e)}",
                  file=sys.stderr)
            return RESOURCE
        if isinstance(e, (DataError, ScheduleError, config_lib.ConfigError, RequestError,
                          RunLocked, NoRunFolder, CheckpointError, DeletionLogError,
                          ReportError, PredictError)):
            print(f"jaxunlearn: error: {e}{_notes(e)}", file=sys.stderr)
            return BAD_INPUT
        if isinstance(e, FloatingPointError):
            print(f"jaxunlearn: training diverged: {e}", file=sys.stderr)
            return DIVERGED
        raise


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _notes(e: BaseException) -> str:
    return "".join(f"\n{note}" for note in getattr(e, "__notes__", ()))


if __name__ == "__main__":
    sys.exit(main())
