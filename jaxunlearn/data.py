"""Datasets: CIFAR-10 (local binary/python layouts, tensorflow-datasets, a bundled sample), any
classification data as arrays (`from_arrays`, an ``.npz`` file: `load_npz`), and named loaders
(`register_dataset`).

Every source yields the same `Dataset`: images (uint8 or float32 ``[n, H, W, C]``, or feature
vectors ``[n, d]``) and int32 labels for the train and test splits, with the number of classes
and the input normalisation (per last axis). An example's id is its position in the training
set; the CIFAR-10 sources keep the official file order, so an id means the same thing whichever
of them produced it, and they carry the CIFAR-10 channel statistics (`CIFAR10_MEAN`,
`CIFAR10_STD`). Data failures raise `DataError` with a message that says what to do.

Bundled sample (`jaxunlearn/_data/cifar10_sample.npz`, built by `experiments/make_sample.py`):
the first 100 training and first 30 test images of each class, in file order (1,000 + 300).
Arrays: `train_labels`, `test_labels` (int32), `train_source_ids`, `test_source_ids` (int64,
positions in the full CIFAR-10 splits), `encoding` (a string), and `train_images`,
`test_images` (uint8 [n, 32, 32, 3]) stored filtered, which deflate compresses to 2.5 MB
instead of 3.7 MB for the raw pixels. Encoding "delta-w-h-rgb-v1", all arithmetic mod 256 in uint8:
horizontal byte deltas along W (first column kept), then vertical deltas along H (first row
kept), then R -= G and B -= G. `load_sample` undoes it exactly: R += G, B += G, then a uint8
cumsum along H and along W.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
import io
import os
import pickle
import socket
import sys
import tarfile
import threading
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from jaxunlearn import download
from jaxunlearn.cifar_format import (BATCH_BYTES, BIN_ARCHIVE, BIN_DIR, BIN_FILES,
                                     DOWNLOAD_HOST, ENV_VAR, HOW_TO_PROVIDE, PY_ARCHIVE, PY_DIR,
                                     PY_FILES, RECORD_BYTES, RECORDS, DataError)

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.49139968, 0.48215841, 0.44653091)
CIFAR10_STD = (0.24703223, 0.24348513, 0.26158784)

SAMPLE_ENCODING = "delta-w-h-rgb-v1"


CIFAR10_CLASSES = len(CLASS_NAMES)
# What a run on CIFAR-10 does not record: its data's spec (`Dataset.spec`) is this.
CIFAR10_SPEC = {"classes": CIFAR10_CLASSES, "input_shape": [32, 32, 3], "dtype": "uint8",
                "mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset as host numpy arrays: the train and test splits.

    Attributes:
      train_images, test_images: uint8 or float32, ``[n, H, W, C]`` images or ``[n, d]``
        feature vectors, the same shape after the first axis in both splits.
      train_labels, test_labels: int32 ``[n]``, each in ``[0, classes)`` (the test split may
        lack some classes).
      source: where it came from, in words (recorded in ``results.json``).
      kind: the kind of source (``binary``, ``sample``, ``npz``, ``arrays``...).
      classes: the number of classes (the models' logits); None: the largest label + 1 over
        both splits.
      mean, std: the input normalisation per last axis (channel or feature): a model sees
        ``(x - mean) / std``, with ``x`` the pixel / 255 for uint8 inputs and the value itself
        for float inputs; None: the statistics of the test inputs (a feature that never
        varies gets std 1). Not the training inputs': every member sees the normalisation, so
        statistics of examples that may be deleted would keep a trace of each of them (their
        sum gives a deleted row back) in every member and every checkpoint; the test split is
        never deleted. The CIFAR-10 sources carry `CIFAR10_MEAN` and `CIFAR10_STD`.

    Shapes, dtypes, labels and statistics are checked on construction (ValueError saying what
    to change); `from_arrays` converts common dtypes first.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str
    kind: str
    classes: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self):
        shape = self.train_images.shape[1:]
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.dtype not in (np.uint8, np.float32) or images.ndim not in (2, 4):
                raise ValueError(
                    f"{split}_images must be uint8 or float32 images [n, H, W, C] or feature "
                    f"vectors [n, d], got {images.dtype} {images.shape}"
                    + ("; add a channel axis (images[..., None])" if images.ndim == 3 else ""))
            if images.shape[1:] != shape:
                raise ValueError(f"train_images {self.train_images.shape} and test_images "
                                 f"{self.test_images.shape} must have the same shape after the "
                                 f"first axis")
            if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
                raise ValueError(f"{split}_labels must be int32 [{len(images)}], got "
                                 f"{labels.dtype} {labels.shape}")
        labels = np.concatenate([self.train_labels, self.test_labels])
        if labels.size and labels.min() < 0:
            where = "train_labels" if (self.train_labels < 0).any() else "test_labels"
            raise ValueError(f"labels must be class numbers 0, 1, ..., found {labels.min()} in "
                             f"{where}; map the classes to 0..classes-1")
        needed = int(labels.max()) + 1 if labels.size else 0
        classes = needed if self.classes is None else self.classes
        if isinstance(classes, bool) or not isinstance(classes, (int, np.integer)) or \
                classes < 2:
            raise ValueError(f"classes must be an integer >= 2 (a classifier needs two classes), "
                             f"got {classes!r}" + ("; the labels hold fewer: declare classes"
                                                   if self.classes is None else ""))
        if classes < needed:
            raise ValueError(f"the labels go up to {needed - 1}, so classes must be at least "
                             f"{needed}, got classes={classes}; declare classes={needed} (or "
                             f"more), or leave it out to take it from the labels")
        object.__setattr__(self, "classes", int(classes))
        for name, value in (("mean", self.mean), ("std", self.std)):
            object.__setattr__(self, name, self._statistic(name, value))

    def _statistic(self, name: str, value) -> tuple[float, ...]:
        width = self.train_images.shape[-1]
        if value is None:  # the test split's: no deletion ever touches it (see the docstring)
            if not self.n_test:
                raise ValueError(f"no test examples to compute the input {name} from; declare "
                                 f"mean and std (from data that is never deleted)")
            value = _input_statistics(self.test_images)[name == "std"]
        try:
            value = np.broadcast_to(np.asarray(value, np.float64), (width,))
        except ValueError:
            raise ValueError(f"{name} must hold one number per channel or feature (the last "
                             f"axis, {width}), got shape {np.shape(value)}") from None
        if not np.all(np.isfinite(value)) or (name == "std" and not np.all(value > 0)):
            raise ValueError(f"{name} must be finite{' and positive' if name == 'std' else ''}, "
                             f"got {value.tolist()}")
        return tuple(float(v) for v in value)

    @property
    def n_train(self) -> int:
        return len(self.train_labels)

    @property
    def n_test(self) -> int:
        return len(self.test_labels)

    @property
    def train_ids(self) -> np.ndarray:
        """Example ids: an example's id is its position in the training set."""
        return np.arange(self.n_train)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One example's shape: ``(H, W, C)`` or ``(d,)``."""
        return tuple(self.train_images.shape[1:])

    @property
    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(mean, std)``: the input normalisation."""
        return self.mean, self.std

    @property
    def spec(self) -> dict:
        """What a model trained on it depends on besides the examples: classes, input shape and
        dtype, normalisation (JSON values; a run records it unless it equals `CIFAR10_SPEC`)."""
        return {"classes": self.classes, "input_shape": list(self.input_shape),
                "dtype": str(self.train_images.dtype), "mean": list(self.mean),
                "std": list(self.std)}

    def limit(self, n_train: int | None, n_test: int | None) -> Dataset:
        """Returns the first `n_train` / `n_test` examples of each split (None keeps all), with
        the same classes and normalisation."""
        if (n_train is not None and n_train < 0) or (n_test is not None and n_test < 0):
            raise ValueError(f"limits must be >= 0, got n_train={n_train}, n_test={n_test}")
        ltr, lte = self.train_labels[:n_train], self.test_labels[:n_test]
        return dataclasses.replace(
            self, train_images=self.train_images[:n_train], train_labels=ltr,
            test_images=self.test_images[:n_test], test_labels=lte,
            source=f"{self.source} (first {len(ltr):,} train / {len(lte):,} test)")


def _input_statistics(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per last axis mean and std (float64) of ``images`` (uint8 pixels / 255); a std of 0 (a
    constant channel or feature) becomes 1."""
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    flat = images.reshape(-1, images.shape[-1])
    mean, sq = np.zeros(flat.shape[1]), np.zeros(flat.shape[1])
    for start in range(0, len(flat), 1 << 20):  # in blocks: no float64 copy of all the data
        block = flat[start:start + (1 << 20)].astype(np.float64) / scale
        mean += block.sum(axis=0)
        sq += np.square(block).sum(axis=0)
    mean /= len(flat)
    std = np.sqrt(np.maximum(sq / len(flat) - np.square(mean), 0.0))
    return mean, np.where(std > 1e-12, std, 1.0)


def from_arrays(train_images, train_labels, test_images, test_labels, *,
                classes: int | None = None, mean=None, std=None,
                source: str = "arrays passed in memory") -> Dataset:
    """A `Dataset` from arrays: images ``[n, H, W, C]`` (uint8 pixels, or floats) or feature
    vectors ``[n, d]`` (floats), and integer labels ``[n]`` in ``[0, classes)``.

    Args:
      classes: the number of classes; None: the largest label + 1 over both splits.
      mean, std: the normalisation per last axis (uint8 inputs in pixel / 255 units); None:
        the test inputs' statistics (never the training inputs': see `Dataset`).
      source: a description, recorded in ``results.json``.
    Floats are stored as float32, labels as int32. Raises ValueError saying what to change.
    A run trained on it keeps only its fingerprint: `forget` and `resume` need the same data
    again (``dataset=...``), or save it with `numpy.savez` and use the file (``data=FILE.npz``).
    """
    def images(name, x):
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32, copy=False)
            if not np.all(np.isfinite(x)):
                raise ValueError(f"{name} holds NaN or infinite values; clean or drop them")
        elif x.dtype != np.uint8:
            raise ValueError(f"{name} must be uint8 (pixels 0..255) or floating point, got "
                             f"{x.dtype}; convert it (x.astype(np.uint8) for pixels, "
                             f"x.astype(np.float32) otherwise)")
        return np.ascontiguousarray(x)

    def labels(name, y):
        y = np.asarray(y)
        if y.dtype == bool or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{name} must be integer class numbers, got {y.dtype}; convert "
                             f"them (e.g. y.astype(np.int64)), or map names to 0..classes-1")
        if y.size and (y.min() < np.iinfo(np.int32).min or y.max() > np.iinfo(np.int32).max):
            raise ValueError(f"{name} must be class numbers 0..classes-1, found "
                             f"{y.min()}..{y.max()}")
        return y.astype(np.int32)

    return Dataset(images("train_images", train_images), labels("train_labels", train_labels),
                   images("test_images", test_images), labels("test_labels", test_labels),
                   source, "arrays", classes, mean, std)


NPZ_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def load_npz(path, *, classes: int | None = None, mean=None, std=None) -> Dataset:
    """A `Dataset` from an ``.npz`` file (`numpy.savez`) holding ``train_images``,
    ``train_labels``, ``test_images`` and ``test_labels`` (as `from_arrays` takes them), and
    optionally ``classes``, ``mean`` and ``std`` (the arguments, when given, take precedence).
    Raises `DataError` saying what is wrong with the file."""
    path = Path(path).expanduser().resolve()
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise DataError(f"no such file {path}; pass an existing .npz file (made with numpy.savez: "
                        f"{', '.join(NPZ_ARRAYS)})") from None
    except (OSError, ValueError, zlib.error) as e:
        raise DataError(f"{path} is not a readable .npz file ({e}); write it with numpy.savez("
                        f"path, {'=..., '.join(NPZ_ARRAYS)}=...)") from e
    missing = [k for k in NPZ_ARRAYS if k not in arrays]
    if missing:
        held = ", ".join(arrays) or "nothing"
        raise DataError(f"{path} lacks {', '.join(missing)} (it holds {held}); an .npz dataset "
                        f"holds {', '.join(NPZ_ARRAYS)}")
    declared = {k: (v if v is not None else arrays.get(k)) for k, v in
                (("classes", classes), ("mean", mean), ("std", std))}
    if declared["classes"] is not None:
        declared["classes"] = int(np.asarray(declared["classes"]))
    try:
        ds = from_arrays(*(arrays[k] for k in NPZ_ARRAYS), **declared,
                         source=f"npz file {path}")
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None
    return dataclasses.replace(ds, kind="npz")


def _check_labels(name: str, labels: np.ndarray) -> np.ndarray:
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{name}: labels must be 0..9, found {labels.min()}..{labels.max()}; "
                        "this is not a CIFAR-10 file: re-download it")
    return labels.astype(np.int32)


def _planes_to_nhwc(pixels: np.ndarray) -> np.ndarray:
    """[n, 3072] rows of R, G, B planes (each 32x32 row-major) -> a view [n, 32, 32, 3]."""
    return pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _check_size(name: str, size: int) -> None:
    if size != BATCH_BYTES:
        raise DataError(
            f"{name}: {size:,} bytes, expected {BATCH_BYTES:,} ({RECORDS:,} records of "
            f"{RECORD_BYTES:,} bytes); the file is truncated or corrupt: re-download "
            f"{BIN_ARCHIVE}")


def _decode_binary(name: str, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    _check_size(name, raw.size)
    records = raw.reshape(RECORDS, RECORD_BYTES)
    return _planes_to_nhwc(records[:, 1:]), _check_labels(name, records[:, 0])


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    """Concatenates (possibly strided) arrays into one C-contiguous array with a single copy."""
    out = np.empty((sum(len(a) for a in arrays),) + arrays[0].shape[1:], arrays[0].dtype)
    start = 0
    for a in arrays:
        out[start:start + len(a)] = a
        start += len(a)
    return out


def _assemble(parts: list[tuple[np.ndarray, np.ndarray]], source: str, kind: str) -> Dataset:
    """(images, labels) per file, the test file last -> a `Dataset`."""
    train, test = parts[:-1], parts[-1:]
    return Dataset(_stack([p[0] for p in train]), _stack([p[1] for p in train]),
                   _stack([p[0] for p in test]), _stack([p[1] for p in test]), source, kind,
                   CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD)


def _read_archive(path: Path, names: tuple[str, ...], layout: str) -> dict[str, bytes]:
    """Reads the members called `names` (by base name) from a tar stream, without extracting."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in names and base not in found:
                    found[base] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read the archive ({e}); it is corrupt or truncated: "
                        "re-download it") from e
    missing = [n for n in names if n not in found]
    if missing:
        raise DataError(f"{path}: the archive lacks {', '.join(missing)} (expected the official "
                        f"'{layout}/' members); re-download it")
    return found


def _missing_files(folder: Path, names: tuple[str, ...]) -> None:
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)}; a complete CIFAR-10 folder has "
                        f"{', '.join(names)}. Re-download and unpack the official archive.")


def load_binary(path) -> Dataset:
    """Loads the CIFAR-10 binary version: a `cifar-10-batches-bin/` folder or its `.tar.gz`.

    Args:
      path: the folder holding `data_batch_{1..5}.bin` and `test_batch.bin`, or the official
        `cifar-10-binary.tar.gz` (read as a stream, nothing is extracted to disk).
    Returns:
      A `Dataset` with 50,000 train and 10,000 test examples in file order.
    """
    path = Path(path)
    if path.is_file():
        members = _read_archive(path, BIN_FILES, BIN_DIR)
        parts = [_decode_binary(f"{path}:{n}", np.frombuffer(members[n], np.uint8))
                 for n in BIN_FILES]
        return _assemble(parts, f"CIFAR-10 binary archive {path}", "binary-archive")
    _missing_files(path, BIN_FILES)
    for name in BIN_FILES:  # sizes first: fail before reading anything
        _check_size(str(path / name), (path / name).stat().st_size)
    parts = [_decode_binary(str(path / n), np.fromfile(path / n, np.uint8)) for n in BIN_FILES]
    return _assemble(parts, f"CIFAR-10 binary folder {path}", "binary")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 writes bytes at protocol 2 as _codecs.encode(str, 'latin1'); allow only that.
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts, numbers and strings; refuses every other global."""

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),  # arrays, Python 2 / numpy 1 (official files)
        ("numpy._core.multiarray", "_reconstruct"),  # arrays, numpy 2
        ("numpy.core.numeric", "_frombuffer"),  # arrays at pickle protocol 5, numpy 1
        ("numpy._core.numeric", "_frombuffer"),  # arrays at pickle protocol 5, numpy 2
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes at pickle protocol 2 written by Python 3
    })

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"contains a disallowed global {module}.{name} and was refused (only numpy "
                "arrays are accepted); it is not an official CIFAR-10 file")
        if module == "_codecs":
            return _latin1_encode
        if module == "numpy":
            return getattr(np, name)
        core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core to _core
        return getattr(getattr(core, module.rsplit(".", 1)[1]), name)


def _decode_pickle(name: str, payload: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _RestrictedUnpickler(io.BytesIO(payload), encoding="bytes").load()
    except Exception as e:  # any failure of an untrusted pickle is a data error
        raise DataError(f"{name}: {e}; re-download {PY_ARCHIVE}") from e
    if not isinstance(batch, dict):
        raise DataError(f"{name}: expected a dict, got {type(batch).__name__}")
    fields = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = fields.get("data"), fields.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape != (
            RECORDS, 3072):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else repr(type(data))
        raise DataError(f"{name}: 'data' must be uint8 [10000, 3072], got {got}; re-download "
                        f"{PY_ARCHIVE}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{name}: 'labels' is not a list of integers ({e})") from e
    if labels.shape != (RECORDS,):
        raise DataError(f"{name}: expected 10000 labels, got shape {labels.shape}")
    return _planes_to_nhwc(data), _check_labels(name, labels)


def load_python(path) -> Dataset:
    """Loads the CIFAR-10 python version: a `cifar-10-batches-py/` folder or its `.tar.gz`.

    The pickles are read with a restricted unpickler that accepts numpy arrays only, so a
    tampered file cannot run code.
    """
    path = Path(path)
    if path.is_file():
        members = _read_archive(path, PY_FILES, PY_DIR)
        parts = [_decode_pickle(f"{path}:{n}", members[n]) for n in PY_FILES]
        return _assemble(parts, f"CIFAR-10 python archive {path}", "python-archive")
    _missing_files(path, PY_FILES)
    parts = [_decode_pickle(str(path / n), (path / n).read_bytes()) for n in PY_FILES]
    return _assemble(parts, f"CIFAR-10 python folder {path}", "python")


def _host_reachable(address: tuple[str, int], timeout: float = 3.0) -> bool:
    """Whether a TCP connection opens within `timeout` seconds (DNS included)."""
    result: list[bool] = []

    def connect():
        try:
            socket.create_connection(address, timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _has_tensorflow() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _tfds_arrays(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
    try:  # random access (array_record) works without TensorFlow
        source = builder.as_data_source(split=split)
        rows = source.__getitems__(list(range(len(source))))
        ids = [r.get("id", b"") for r in rows]
        images = np.stack([r["image"] for r in rows]) if rows else np.empty((0, 32, 32, 3))
        labels = np.array([r["label"] for r in rows])
    except NotImplementedError:  # tfrecord: needs TensorFlow
        import tensorflow_datasets as tfds
        batch = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
        images, labels, ids = batch["image"], batch["label"], list(batch.get("id", []))
    try:  # tfds shuffles on write; its ids ("train_00042") give back the file order
        keys = [int((i.decode() if isinstance(i, bytes) else str(i)).rsplit("_", 1)[-1])
                for i in ids]
        order = np.argsort(keys, kind="stable") if len(keys) == len(labels) else slice(None)
    except ValueError:
        order = slice(None)
    return (np.ascontiguousarray(images[order], dtype=np.uint8),
            _check_labels(f"tfds cifar10 {split}", labels[order]))


def load_tfds(data_dir: str | None = None, download: bool = False) -> Dataset:
    """Loads CIFAR-10 through tensorflow-datasets (optional extra `jaxunlearn[tfds]`).

    Args:
      data_dir: tfds data folder (None: tfds's default, `~/tensorflow_datasets`).
      download: download and prepare it when it is not prepared yet (needs the network and
        TensorFlow); fails within seconds when the download host is unreachable.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError("tensorflow-datasets is not installed: pip install 'jaxunlearn[tfds]', "
                        "or use a local CIFAR-10 layout or the bundled sample.\n"
                        + HOW_TO_PROVIDE) from e
    try:
        builder = tfds.builder("cifar10", data_dir=None if data_dir is None else str(data_dir))
        where = builder.data_dir
        if not builder.is_prepared():
            if not download:
                raise DataError(f"tensorflow-datasets has no prepared cifar10 in {where} (and "
                                "download is off).\n" + HOW_TO_PROVIDE)
            if not _has_tensorflow():
                raise DataError(f"tensorflow-datasets has no prepared cifar10 in {where}, and "
                                "preparing it needs TensorFlow: pip install tensorflow.\n"
                                + HOW_TO_PROVIDE)
            if not _host_reachable(DOWNLOAD_HOST):
                raise DataError(f"cannot reach {DOWNLOAD_HOST[0]} to download CIFAR-10 (offline?)."
                                "\n" + HOW_TO_PROVIDE)
            builder.download_and_prepare(file_format="array_record")
        train, test = _tfds_arrays(builder, "train"), _tfds_arrays(builder, "test")
    except DataError:
        raise
    except Exception as e:  # tfds raises many types (ImportError for TensorFlow, IO errors...)
        raise DataError(f"tensorflow-datasets failed to provide cifar10 ({type(e).__name__}: "
                        f"{e}). Preparing it needs TensorFlow (pip install tensorflow); or use "
                        "another source.\n" + HOW_TO_PROVIDE) from e
    return _assemble([train, test], f"tensorflow-datasets cifar10 in {where}", "tfds")


def load_sample() -> Dataset:
    """Loads the bundled class-balanced sample (1,000 train / 300 test), fully offline."""
    resource = importlib.resources.files("jaxunlearn").joinpath("_data", "cifar10_sample.npz")
    try:
        with resource.open("rb") as f, np.load(f) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zlib.error) as e:
        raise DataError(f"the bundled sample {resource} is missing or corrupt ({e}); reinstall "
                        "jaxunlearn") from e
    if str(arrays.get("encoding")) != SAMPLE_ENCODING:
        raise DataError(f"the bundled sample has encoding {arrays.get('encoding')}, expected "
                        f"{SAMPLE_ENCODING}; reinstall jaxunlearn")
    try:
        return Dataset(decode_sample_images(arrays["train_images"]), arrays["train_labels"],
                       decode_sample_images(arrays["test_images"]), arrays["test_labels"],
                       f"bundled CIFAR-10 sample {resource}", "sample", CIFAR10_CLASSES,
                       CIFAR10_MEAN, CIFAR10_STD)
    except (KeyError, ValueError) as e:
        raise DataError(f"the bundled sample {resource} is malformed ({e}); reinstall "
                        "jaxunlearn") from e


def encode_sample_images(images: np.ndarray) -> np.ndarray:
    """uint8 [n, 32, 32, 3] -> filtered bytes (see the module docstring), same shape."""
    x = np.diff(images, axis=2, prepend=np.uint8(0))
    x = np.diff(x, axis=1, prepend=np.uint8(0))
    x[..., 0] -= x[..., 1]
    x[..., 2] -= x[..., 1]
    return x


def decode_sample_images(encoded: np.ndarray) -> np.ndarray:
    """Exact inverse of `encode_sample_images`."""
    x = encoded.copy()
    x[..., 0] += x[..., 1]
    x[..., 2] += x[..., 1]
    return np.cumsum(np.cumsum(x, axis=1, dtype=np.uint8), axis=2, dtype=np.uint8)


def find_local(path) -> tuple[str, Path]:
    """Resolves a local path to (kind, path): the layout folder, its parent, or an archive.

    Kinds: "binary", "python" (folders), "binary-archive", "python-archive".
    """
    path = Path(path).expanduser()
    if path.is_file():
        try:
            with tarfile.open(path, mode="r|*") as tar:
                first = next(iter(tar), None)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: not a readable tar archive ({e}); expected "
                            f"{BIN_ARCHIVE} or {PY_ARCHIVE}") from e
        member = first.name if first else ""
        for name, (binary, python) in ((member, (BIN_DIR, PY_DIR)),
                                       (path.name, ("binary", "python"))):
            if binary in name or python in name:
                return ("binary-archive" if binary in name else "python-archive"), path
        raise DataError(f"{path}: a tar archive, but not a CIFAR-10 one (expected members under "
                        f"'{BIN_DIR}/' or '{PY_DIR}/')")
    if path.is_dir():
        for names, kind in ((BIN_FILES, "binary"), (PY_FILES, "python")):
            if any((path / n).is_file() for n in names):
                return kind, path
        for child, kind in ((BIN_DIR, "binary"), (PY_DIR, "python"),
                            (BIN_ARCHIVE, "binary-archive"), (PY_ARCHIVE, "python-archive")):
            if (path / child).exists():
                return kind, path / child
    looked = (f"{path} as a folder with {BIN_FILES[0]}.. or {PY_FILES[0]}.., or holding "
              f"{BIN_DIR}/, {PY_DIR}/, {BIN_ARCHIVE} or {PY_ARCHIVE}")
    state = "is an empty or unrelated folder" if path.is_dir() else "does not exist"
    raise DataError(f"No CIFAR-10 data at {path} (it {state}). Looked for {looked}.\n"
                    + HOW_TO_PROVIDE)


def _load_local(path) -> Dataset:
    kind, resolved = find_local(path)
    return load_binary(resolved) if kind.startswith("binary") else load_python(resolved)


def _tfds_prepared_default() -> tuple[bool, str]:
    """(prepared?, what was looked at) for tfds's default data_dir; never downloads."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        return False, "tensorflow-datasets is not installed"
    try:
        builder = tfds.builder("cifar10")
        return builder.is_prepared(), f"tensorflow-datasets has no prepared cifar10 in " \
                                      f"{builder.data_dir}"
    except Exception as e:  # a broken tfds install should not hide the other sources
        return False, f"tensorflow-datasets failed ({type(e).__name__}: {e})"


def load_cifar10() -> Dataset:
    """CIFAR-10 found automatically: the path in $JAXUNLEARN_DATA if set, else the copy
    `jaxunlearn data --download` put in the user cache (`jaxunlearn.download`), else
    tensorflow-datasets when installed and already prepared in its default folder (never
    downloads), else `DataError` naming what was looked for and how to provide data."""
    env = os.environ.get(ENV_VAR)
    if env:
        try:
            return _load_local(env)
        except DataError as e:
            raise DataError(f"${ENV_VAR}={env}: {e}") from e
    found = download.cached()
    if found is not None:
        return load_binary(found)
    prepared, looked = _tfds_prepared_default()
    if prepared:
        return load_tfds(download=False)
    raise DataError(f"No CIFAR-10 data found: ${ENV_VAR} is not set, the cache "
                    f"{download.default_dir()} holds no download, and {looked}.\n"
                    + HOW_TO_PROVIDE)


# Named datasets (the `data` setting): name -> a loader taking no arguments that returns a
# `Dataset`. `register_dataset` adds to it.
ORIGINS: dict[str, str] = {}  # name -> the module that called `register_dataset` for it
DATASETS: dict[str, Callable[[], Dataset]] = {"sample": load_sample, "cifar10": load_cifar10}


def register_dataset(name: str, loader: Callable[[], Dataset]) -> Callable[[], Dataset]:
    """Makes ``data=NAME`` load ``loader()``, a `Dataset` (e.g. `from_arrays` of your arrays),
    in every command that loads data (run, resume, forget). A run using it records the loader's
    module, and every command that reopens the run imports it again (`jaxunlearn.plugins`).
    Returns ``loader`` (so it can decorate it).

    A name is a word that is not a path: no ``/``, not ``tfds...``, not ``*.npz``; a name taken
    by another loader is refused (ValueError)."""
    if not isinstance(name, str) or not name or "/" in name or os.sep in name or \
            name.startswith("tfds") or name.endswith(".npz"):
        raise ValueError(f"dataset name {name!r} must be a non-empty word, not a path, 'tfds...' "
                         f"or '*.npz'; choose another name")
    if not callable(loader):
        raise ValueError(f"register_dataset({name!r}, loader): loader must be callable "
                         f"(loader() -> Dataset), got {type(loader).__name__}")
    if DATASETS.get(name, loader) is not loader:
        raise ValueError(f"dataset name {name!r} is taken by {DATASETS[name]!r}; choose another "
                         f"name")
    DATASETS[name] = loader
    # The module that registered it: what another process imports to have it again
    # (`jaxunlearn.plugins`), also when the loader is a partial of someone else's function.
    ORIGINS[name] = sys._getframe(1).f_globals.get("__name__", "")
    return loader


def _load_named(name: str) -> Dataset:
    try:
        ds = DATASETS[name]()
    except ValueError as e:  # a Dataset's own checks
        raise DataError(f"the dataset {name!r} ({DATASETS[name]!r}) is invalid: {e}") from e
    if not isinstance(ds, Dataset):
        raise DataError(f"the loader registered as {name!r} returned {type(ds).__name__}; it "
                        f"must return a jaxunlearn.data.Dataset (e.g. data.from_arrays(...))")
    return ds


def load_dataset(spec: str | None) -> Dataset:
    """Loads the dataset ``spec`` names: a registered name (`DATASETS`: "sample", "cifar10",
    yours), "tfds" or "tfds:DATA_DIR", an ``.npz`` file (`load_npz`), a CIFAR-10 folder or
    archive, or None/"" for CIFAR-10 found automatically (`load_cifar10`).

    "tfds" downloads and prepares CIFAR-10 when needed.
    """
    if not spec:
        return load_cifar10()
    if spec in DATASETS:
        return _load_named(spec)
    if spec == "tfds" or spec.startswith("tfds:"):
        return load_tfds(data_dir=os.path.expanduser(spec[5:]) or None, download=True)
    if spec.endswith(".npz"):
        return load_npz(spec)
    return _load_local(spec)


def describe(spec: str | None) -> str:
    """A multi-line report of the source `spec` resolves to (for `jaxunlearn data`).

    Raises `DataError` (saying exactly what is missing) when nothing is found.
    """
    ds = load_dataset(spec)
    cifar = ds.spec == CIFAR10_SPEC
    names = CLASS_NAMES if cifar else [str(c) for c in range(ds.classes)]
    train_counts = np.bincount(ds.train_labels, minlength=ds.classes)
    test_counts = np.bincount(ds.test_labels, minlength=ds.classes)
    what = "images" if len(ds.input_shape) == 3 else "examples"
    lines = [f"source: {ds.source}", f"kind:   {ds.kind}",
             f"train:  {ds.n_train:,} {what}   test: {ds.n_test:,} {what}", "",
             f"{'class':<12}{'train':>8}{'test':>8}"]
    lines += [f"{name:<12}{a:>8,}{b:>8,}" for name, a, b in
              zip(names, train_counts, test_counts, strict=True)]
    if cifar and ds.n_train:
        mean = ds.train_images.reshape(-1, 3).mean(axis=0) / 255.0
        lines += ["", "train pixel mean (R, G, B) / 255: " + ", ".join(f"{m:.4f}" for m in mean)
                  + "   (full CIFAR-10: " + ", ".join(f"{m:.4f}" for m in CIFAR10_MEAN) + ")"]
    elif not cifar:
        shown = lambda v: ", ".join(f"{m:.4f}" for m in v[:8]) + (", ..." if len(v) > 8 else "")
        lines += ["", f"input: {ds.train_images.dtype} {list(ds.input_shape)}, {ds.classes} "
                      f"classes", f"normalisation mean: {shown(ds.mean)}",
                  f"normalisation std:  {shown(ds.std)}"]
    return "\n".join(lines)
