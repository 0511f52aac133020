"""Load a trained run and ask it for predictions, without its lock and without printing.

    python examples/load_and_predict.py                 # trains the smoke preset first
    python examples/load_and_predict.py RUN_DIR         # any finished run on CIFAR-10 images

Prints the ensemble's accuracy on the first 100 test images of the bundled sample, each
member's, and checks that applying one member's exported Flax variables by hand gives the same
probabilities as `predict` (they are plain variables: save them, serve them, fine-tune them).
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

import jaxunlearn as ju


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", help="a trained run (default: train `smoke` "
                                                   "into --out first)")
    parser.add_argument("--out", default="runs/example-predict", help="where to train one")
    args = parser.parse_args(argv)
    run_dir = pathlib.Path(args.run_dir or args.out)
    if args.run_dir is None and not (run_dir / "results.json").is_file():
        ju.train(ju.PRESETS["smoke"], run_dir, log=lambda line: None)

    run = ju.load(run_dir)  # read-only: no lock, nothing printed
    print(run)
    sample = ju.load_dataset("sample")
    images, labels = sample.test_images[:100], sample.test_labels[:100]

    probs = run.predict(images)  # [100, classes]: the run's aggregation and TTA
    each = run.predict(images, per_member=True)  # [members, 100, classes]
    accuracy = float(np.mean(probs.argmax(axis=1) == labels))
    members = [float(np.mean(p.argmax(axis=1) == labels)) for p in each]
    print(f"ensemble accuracy {accuracy:.1%}; members " + ", ".join(f"{a:.1%}" for a in members))

    # One member by hand: its plain Flax variables applied to the preprocessed images.
    variables = run.variables(member=0)
    logits = np.asarray(run.module().apply(variables, run.preprocess(images), train=False),
                        np.float64)
    if run.config.tta:  # the run scores each image with its mirror image too
        mirrored = run.preprocess(images[:, :, ::-1])
        logits = 0.5 * (logits + np.asarray(run.module().apply(variables, mirrored,
                                                               train=False)))
    by_hand = np.exp(logits - logits.max(axis=1, keepdims=True))
    by_hand /= by_hand.sum(axis=1, keepdims=True)
    gap = float(np.abs(by_hand - each[0]).max())
    print(f"member 0 applied by hand: largest difference from predict {gap:.1e}")
    assert gap < 1e-4, gap
    return {"accuracy": accuracy, "members": members, "gap": gap}


if __name__ == "__main__":
    main()
