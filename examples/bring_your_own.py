"""Your data, your model and your unlearning method, end to end.

    python examples/bring_your_own.py [--out DIR]

`my_plugins.py` (beside this file) registers a dataset (``blobs``: feature vectors), a model
(``mlp``: no BatchNorm) and a strategy with a setting (``gradascent``, ``ascent_weight``).
This script trains 4 MLPs on SISA shards of the blobs with that strategy, then forgets three
ids and audits the run from NEW processes on the command line, which import `my_plugins`
again because the run recorded it, and finally loads the run and predicts.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import my_plugins  # noqa: E402  (registers blobs, mlp and gradascent)

import jaxunlearn as ju  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bring-your-own", help="the run folder (replaced)")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    shutil.rmtree(out, ignore_errors=True)

    cfg = ju.Config(data="blobs", model="mlp", baseline="none", members=4, plan="shards",
                    fraction=1.0, phases=2, epochs=4, batch_size=32, eval_batch_size=150,
                    learning_rate=0.01, deletion_rate=0.0, strategy="gradascent",
                    ascent_weight=0.5, oracle_reference="end", evaluators="scores,mia")
    results = ju.train(cfg, out, log=print)
    print(f"trained: ensemble test accuracy {results['final']['ensemble']['test_accuracy']:.1%}")
    print("recorded plug-ins:", results["config"]["plugins"])

    # New processes: the command line knows nothing of my_plugins until the run tells it.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "jaxunlearn.cli"]
    forget = subprocess.run(command + ["forget", str(out), "--ids", "3,4,5"], env=env,
                            capture_output=True, text=True)
    print(forget.stdout + forget.stderr)
    audit = subprocess.run(command + ["audit", str(out)], env=env, capture_output=True,
                           text=True)
    print(audit.stdout + audit.stderr)
    if forget.returncode or audit.returncode:
        raise SystemExit(f"forget exited {forget.returncode}, audit {audit.returncode}")

    run = ju.load(out)
    test = my_plugins.blobs()
    probs = run.predict(test.test_images)
    accuracy = float(np.mean(probs.argmax(axis=1) == test.test_labels))
    print(f"{run}: test accuracy after forgetting {accuracy:.1%}")
    return {"accuracy": accuracy, "results": run.results}


if __name__ == "__main__":
    main()
