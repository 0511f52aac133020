"""The CIFAR-10 distribution's format: its files, their records, the official archives, and
the error (with what to do) when no copy is found. Shared by the loaders (`jaxunlearn.data`)
and the download (`jaxunlearn.download`), which sits below the loaders."""

from __future__ import annotations

ENV_VAR = "JAXUNLEARN_DATA"  # a CIFAR-10 folder or archive for `--data cifar10`
RECORDS, RECORD_BYTES = 10_000, 1 + 3 * 32 * 32
BATCH_BYTES = RECORDS * RECORD_BYTES  # 30,730,000
BIN_DIR, PY_DIR = "cifar-10-batches-bin", "cifar-10-batches-py"
BIN_ARCHIVE, PY_ARCHIVE = "cifar-10-binary.tar.gz", "cifar-10-python.tar.gz"
BIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6)) + ("test_batch.bin",)
PY_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
DOWNLOAD_HOST = ("www.cs.toronto.edu", 443)  # the tfds cifar10 builder downloads from here
HOW_TO_PROVIDE = (
    "Ways to provide CIFAR-10:\n"
    "  jaxunlearn data --download   fetch the official archive once into the user cache\n"
    "                        (then --data cifar10, or no --data with the seed preset, finds it)\n"
    f"  --data PATH           a '{BIN_DIR}/' or '{PY_DIR}/' folder, a folder\n"
    f"                        holding one, or the official '{BIN_ARCHIVE}' or\n"
    f"                        '{PY_ARCHIVE}' archive\n"
    f"  {ENV_VAR}=PATH  the same, through the environment\n"
    "  --data tfds           tensorflow-datasets: pip install 'jaxunlearn[tfds]' (downloads once)\n"
    "  --data sample         the bundled 1,000/300-image sample (offline demos and tests)")


class DataError(Exception):
    """A dataset could not be found or read; the message says what to do."""
