"""Builds the bundled offline sample `jaxunlearn/_data/cifar10_sample.npz` from real CIFAR-10.

    python experiments/make_sample.py --source PATH/cifar-10-batches-bin

(with jaxunlearn installed, e.g. `pip install -e .`, or `PYTHONPATH=.` from the repo root.)

Takes the first K training and first J test examples of each class in file order (defaults
K=100, J=30: 1,000 + 300 images), keeping them in their original order so that in-order chunks
stay class-mixed, stores their positions in the full splits as `train_source_ids` /
`test_source_ids`, filters the pixels as described in `jaxunlearn/data.py` (encoding
"delta-w-h-rgb-v1") and writes them with `np.savez_compressed`. Checks that the file decodes to
exactly the source pixels and stays under 4,000,000 bytes. Takes a few seconds.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

from jaxunlearn import data

MAX_BYTES = 4_000_000
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "jaxunlearn" / "_data" / "cifar10_sample.npz"


def first_per_class(labels: np.ndarray, k: int) -> np.ndarray:
    """Positions of the first `k` examples of each class, in ascending (file) order."""
    picked = [np.flatnonzero(labels == c)[:k] for c in range(len(data.CLASS_NAMES))]
    if any(len(p) < k for p in picked):
        raise SystemExit(f"some class has fewer than {k} examples")
    return np.sort(np.concatenate(picked))


def build(source: str, k_train: int, k_test: int) -> tuple[dict[str, np.ndarray], data.Dataset]:
    """The arrays of the sample file and the full dataset they were drawn from."""
    full = data.load_binary(source)
    train_ids = first_per_class(full.train_labels, k_train)
    test_ids = first_per_class(full.test_labels, k_test)
    return {
        "encoding": np.array(data.SAMPLE_ENCODING),
        "train_images": data.encode_sample_images(full.train_images[train_ids]),
        "train_labels": full.train_labels[train_ids],
        "test_images": data.encode_sample_images(full.test_images[test_ids]),
        "test_labels": full.test_labels[test_ids],
        "train_source_ids": train_ids.astype(np.int64),
        "test_source_ids": test_ids.astype(np.int64),
    }, full


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", required=True,
                        help="a cifar-10-batches-bin folder or cifar-10-binary.tar.gz")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=30)
    args = parser.parse_args(argv)

    arrays, full = build(args.source, args.train_per_class, args.test_per_class)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    size = buffer.getbuffer().nbytes
    for split in ("train", "test"):  # the encoding must round-trip exactly
        decoded = data.decode_sample_images(arrays[f"{split}_images"])
        source = getattr(full, f"{split}_images")[arrays[f"{split}_source_ids"]]
        assert np.array_equal(decoded, source), f"{split}: encoding does not round-trip"
    if size >= MAX_BYTES:
        print(f"sample is {size:,} bytes, over {MAX_BYTES:,}: lower the per-class counts",
              file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(buffer.getvalue())
    raw = sum(arrays[f"{s}_images"].nbytes for s in ("train", "test"))
    print(f"wrote {args.out}: {len(arrays['train_labels']):,} train + "
          f"{len(arrays['test_labels']):,} test images, {size:,} bytes "
          f"({size / raw:.0%} of the raw pixels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
