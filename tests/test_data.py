"""Tests for jaxunlearn.data: loaders, validation, the restricted unpickler, sample, auto mode.

Tests marked by the `real` fixture need the real CIFAR-10 binary folder in $JAXUNLEARN_DATA and
are skipped without it; all others build small or synthetic data in tmp_path.
"""

import io
import os
import pickle
import socket
import struct
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest

from jaxunlearn import data

BATCH_BYTES = 30_730_000
BIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
PY_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


# ---------------------------------------------------------------- helpers and fixtures

def synthetic_records(batch: int) -> np.ndarray:
    """10,000 binary records whose pixel value encodes (record, channel, row, column)."""
    g = (batch * 10_000 + np.arange(10_000)).astype(np.uint8)[:, None]
    c, y, x = np.unravel_index(np.arange(3072), (3, 32, 32))
    pixels = g + (c * 50 + y * 3 + x).astype(np.uint8)[None, :]
    labels = ((batch * 10_000 + np.arange(10_000)) * 7 % 10).astype(np.uint8)[:, None]
    return np.concatenate([labels, pixels], axis=1)


def expected_pixel(g, y, x, c):
    return (g + c * 50 + y * 3 + x) % 256


def write_tar_gz(folder: Path, archive: Path, arcname: str) -> Path:
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        tar.add(folder, arcname=arcname)
    return archive


class Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 `str` (BINSTRING), as the official files have them."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_str8(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        n = len(raw)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + raw if n < 256
                   else pickle.BINSTRING + struct.pack("<i", n) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_str8
    dispatch[str] = save_str8


def official_batch(images: np.ndarray, labels: np.ndarray, name: str) -> dict:
    """A dict shaped like an official python-version batch, from NHWC images."""
    flat = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    return {b"batch_label": name.encode(), b"labels": [int(v) for v in labels],
            b"data": np.ascontiguousarray(flat),
            b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]}


def dump_batch(batch: dict, style: str) -> bytes:
    if style == "py2":  # as the official Python 2 / numpy 1 files
        buffer = io.BytesIO()
        Py2Pickler(buffer, protocol=2).dump(batch)
        payload = buffer.getvalue()
        legacy = payload.replace(b"cnumpy._core.multiarray\n_reconstruct\n",
                                 b"cnumpy.core.multiarray\n_reconstruct\n")
        return legacy
    if style == "protocol2":  # Python 3, protocol 2: bytes go through _codecs.encode
        return pickle.dumps(batch, protocol=2)
    return pickle.dumps({k.decode(): v for k, v in batch.items()}, protocol=5)  # str keys


def write_python_folder(ds: data.Dataset, folder: Path, style: str) -> Path:
    folder.mkdir(parents=True)
    splits = [(ds.train_images[i * 10_000:(i + 1) * 10_000],
               ds.train_labels[i * 10_000:(i + 1) * 10_000]) for i in range(5)]
    splits.append((ds.test_images, ds.test_labels))
    for name, (images, labels) in zip(PY_FILES, splits, strict=True):
        (folder / name).write_bytes(dump_batch(official_batch(images, labels, name), style))
    return folder


def assert_same(a: data.Dataset, b: data.Dataset):
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and np.array_equal(x, y), field


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synthetic") / "cifar-10-batches-bin"
    folder.mkdir()
    for i, name in enumerate(BIN_FILES):
        synthetic_records(i).tofile(folder / name)
    return folder


@pytest.fixture(scope="module")
def synthetic(synthetic_dir) -> data.Dataset:
    return data.load_binary(synthetic_dir)


@pytest.fixture
def broken_dir(tmp_path, synthetic_dir):
    """A fresh folder of links to the synthetic files, for a test to damage."""
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for name in BIN_FILES:
        (folder / name).symlink_to(synthetic_dir / name)
    return folder


@pytest.fixture(scope="module")
def real_dir() -> Path:
    path = os.environ.get(data.ENV_VAR)
    if not path:
        pytest.skip(f"${data.ENV_VAR} is not set (real CIFAR-10 binary folder)")
    kind, resolved = data.find_local(path)
    if kind != "binary":
        pytest.skip(f"${data.ENV_VAR} is a {kind} source, these tests need the binary folder")
    return resolved


@pytest.fixture(scope="module")
def real(real_dir) -> data.Dataset:
    return data.load_binary(real_dir)


# ---------------------------------------------------------------- binary layout

def test_binary_folder_layout_and_order(synthetic):
    assert (synthetic.n_train, synthetic.n_test, synthetic.kind) == (50_000, 10_000, "binary")
    assert synthetic.train_images.shape == (50_000, 32, 32, 3)
    assert synthetic.train_images.dtype == np.uint8 and synthetic.train_labels.dtype == np.int32
    assert synthetic.train_images.flags.c_contiguous and synthetic.test_images.flags.c_contiguous
    g = np.array([0, 9_999, 10_000, 31_234, 49_999])
    y, x, c = np.meshgrid(np.arange(32), np.arange(32), np.arange(3), indexing="ij")
    for i in g:  # planes R, G, B of the record became the last (channel) axis
        assert np.array_equal(synthetic.train_images[i], expected_pixel(i, y, x, c))
        assert synthetic.train_labels[i] == i * 7 % 10
    assert np.array_equal(synthetic.test_images[3], expected_pixel(50_003, y, x, c))
    np.testing.assert_array_equal(synthetic.train_ids, np.arange(50_000))


def test_binary_archive_reads_the_tar_stream(tmp_path, synthetic_dir, synthetic):
    archive = write_tar_gz(synthetic_dir, tmp_path / "cifar-10-binary.tar.gz",
                           "cifar-10-batches-bin")
    loaded = data.load_binary(archive)
    assert loaded.kind == "binary-archive"
    assert_same(loaded, synthetic)
    assert data.find_local(tmp_path) == ("binary-archive", archive)
    assert list(tmp_path.iterdir()) == [archive]  # nothing was extracted


@pytest.mark.parametrize("size", [BATCH_BYTES - 3073, BATCH_BYTES - 1, BATCH_BYTES + 5])
def test_wrong_size_file_names_file_and_expected_size(broken_dir, size):
    target = broken_dir / "data_batch_3.bin"
    raw = np.fromfile(target, np.uint8)
    target.unlink()
    np.resize(raw, size).tofile(target)
    with pytest.raises(data.DataError) as e:
        data.load_binary(broken_dir)
    message = str(e.value)
    assert "data_batch_3.bin" in message and f"{size:,} bytes" in message
    assert "30,730,000" in message and "3,073" in message and "re-download" in message


def test_missing_batch_files_are_listed(broken_dir):
    for name in ("data_batch_2.bin", "test_batch.bin"):
        (broken_dir / name).unlink()
    with pytest.raises(data.DataError, match="missing data_batch_2.bin, test_batch.bin"):
        data.load_binary(broken_dir)


def test_labels_out_of_range(broken_dir):
    records = synthetic_records(5)
    records[123, 0] = 10
    (broken_dir / "test_batch.bin").unlink()
    records.tofile(broken_dir / "test_batch.bin")
    with pytest.raises(data.DataError, match=r"test_batch.bin: labels must be 0..9"):
        data.load_binary(broken_dir)


def test_truncated_archive(tmp_path, synthetic_dir):
    archive = write_tar_gz(synthetic_dir, tmp_path / "full.tar.gz", "cifar-10-batches-bin")
    cut = tmp_path / "cifar-10-binary.tar.gz"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(data.DataError, match="corrupt or truncated"):
        data.load_binary(cut)


def test_find_local_resolution(tmp_path, synthetic_dir):
    parent = synthetic_dir.parent
    assert data.find_local(synthetic_dir) == ("binary", synthetic_dir)
    assert data.find_local(parent) == ("binary", synthetic_dir)
    assert data.load_dataset(str(parent)).n_train == 50_000
    (tmp_path / "cifar-10-batches-py").mkdir()
    assert data.find_local(tmp_path) == ("python", tmp_path / "cifar-10-batches-py")
    empty = tmp_path / "empty"
    empty.mkdir()
    for missing in (empty, tmp_path / "nope"):
        with pytest.raises(data.DataError) as e:
            data.find_local(missing)
        for wanted in ("cifar-10-batches-bin", "cifar-10-batches-py", "cifar-10-binary.tar.gz",
                       "cifar-10-python.tar.gz", "--data"):
            assert wanted in str(e.value)


# ---------------------------------------------------------------- python layout

@pytest.mark.parametrize("style", ["py2", "protocol2", "protocol5-str-keys"])
def test_python_folder_matches_binary(tmp_path, synthetic, style):
    folder = write_python_folder(synthetic, tmp_path / "cifar-10-batches-py", style)
    assert data.find_local(tmp_path) == ("python", folder)
    loaded = data.load_python(folder)
    assert loaded.kind == "python"
    assert_same(loaded, synthetic)


def test_python_archive_matches_binary(tmp_path, synthetic):
    folder = write_python_folder(synthetic, tmp_path / "src" / "cifar-10-batches-py", "py2")
    archive = write_tar_gz(folder, tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py")
    assert data.find_local(archive) == ("python-archive", archive)
    loaded = data.load_dataset(str(archive))
    assert loaded.kind == "python-archive"
    assert_same(loaded, synthetic)


def test_python_batch_with_wrong_shape(tmp_path):
    batch = {b"data": np.zeros((10, 3072), np.uint8), b"labels": [0] * 10}
    with pytest.raises(data.DataError, match=r"uint8 \[10000, 3072\]"):
        data._decode_pickle("data_batch_1", pickle.dumps(batch, protocol=2))


class Planted:
    """Runs a command when unpickled by an unrestricted unpickler."""

    def __init__(self, call, args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


@pytest.mark.parametrize("how", ["os.system", "open", "nested"])
def test_restricted_unpickler_refuses_planted_code(tmp_path, how):
    marker = tmp_path / "MARKER"
    planted = {"os.system": Planted(os.system, (f"touch {marker}",)),
               "open": Planted(open, (str(marker), "w")),
               "nested": {b"data": Planted(os.system, (f"touch {marker}",)), b"labels": []},
               }[how]
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in PY_FILES:
        (folder / name).write_bytes(b"")
    (folder / "data_batch_1").write_bytes(pickle.dumps(planted, protocol=2))
    with pytest.raises((data.DataError, pickle.UnpicklingError)) as e:
        data.load_python(folder)
    assert "disallowed global" in str(e.value) and "refused" in str(e.value)
    assert "data_batch_1" in str(e.value)
    assert not marker.exists()


# ---------------------------------------------------------------- bundled sample

def test_sample_counts_balance_and_size():
    sample = data.load_sample()
    assert (sample.n_train, sample.n_test, sample.kind) == (1_000, 300, "sample")
    assert sample.train_images.shape == (1_000, 32, 32, 3)
    assert sample.train_images.dtype == np.uint8 and sample.test_labels.dtype == np.int32
    assert np.all(np.bincount(sample.train_labels, minlength=10) == 100)
    assert np.all(np.bincount(sample.test_labels, minlength=10) == 30)
    first_chunk = sample.train_labels[:200]  # original order: early chunks are class-mixed
    assert len(np.unique(first_chunk)) == 10
    path = Path(data.__file__).parent / "_data" / "cifar10_sample.npz"
    assert path.stat().st_size < 4_000_000
    with np.load(path) as z:
        for split in ("train", "test"):
            ids = z[f"{split}_source_ids"]
            assert np.all(np.diff(ids) > 0)
        assert str(z["encoding"]) == data.SAMPLE_ENCODING


def test_sample_encoding_round_trips():
    images = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    encoded = data.encode_sample_images(images)
    assert encoded.dtype == np.uint8 and encoded.shape == images.shape
    assert np.array_equal(data.decode_sample_images(encoded), images)


def test_sample_matches_real_data(real):
    sample = data.load_sample()
    path = Path(data.__file__).parent / "_data" / "cifar10_sample.npz"
    with np.load(path) as z:
        train_ids, test_ids = z["train_source_ids"], z["test_source_ids"]
    assert np.array_equal(sample.train_images, real.train_images[train_ids])
    assert np.array_equal(sample.train_labels, real.train_labels[train_ids])
    assert np.array_equal(sample.test_images, real.test_images[test_ids])
    assert np.array_equal(sample.test_labels, real.test_labels[test_ids])
    for labels, ids, k in ((real.train_labels, train_ids, 100), (real.test_labels, test_ids, 30)):
        expected = np.sort(np.concatenate([np.flatnonzero(labels == c)[:k] for c in range(10)]))
        assert np.array_equal(ids, expected)


# ---------------------------------------------------------------- dataset, auto mode, describe

def test_limit_and_validation(synthetic):
    small = synthetic.limit(1_000, None)
    assert (small.n_train, small.n_test) == (1_000, 10_000)
    assert np.array_equal(small.train_images, synthetic.train_images[:1_000])
    assert synthetic.limit(None, 5).n_test == 5 and "first" in small.source
    with pytest.raises(ValueError):
        data.Dataset(synthetic.train_images, synthetic.train_labels.astype(np.int64),
                     synthetic.test_images, synthetic.test_labels, "x", "binary")


def no_tfds(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)


def test_auto_without_any_source_explains_what_to_do(monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    no_tfds(monkeypatch)
    for spec in (None, "cifar10"):
        with pytest.raises(data.DataError) as e:
            data.load_dataset(spec)
        message = str(e.value)
        for wanted in ("--data", "sample", data.ENV_VAR, "jaxunlearn[tfds]",
                       "tensorflow-datasets is not installed", "cifar-10-binary.tar.gz"):
            assert wanted in message


def test_auto_uses_the_environment_variable(monkeypatch, synthetic_dir, tmp_path):
    monkeypatch.setenv(data.ENV_VAR, str(synthetic_dir.parent))
    assert data.load_dataset(None).source.endswith(str(synthetic_dir))
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(data.DataError, match=data.ENV_VAR):
        data.load_dataset("cifar10")


def test_describe_sample():
    report = data.describe("sample")
    assert "sample" in report and "1,000" in report and "300" in report
    for name in data.CLASS_NAMES:
        assert name in report
    assert "100" in report and "mean" in report


def test_data_command_reports_missing_data(monkeypatch, tmp_path, capsys):
    from jaxunlearn import cli

    monkeypatch.delenv(data.ENV_VAR, raising=False)
    no_tfds(monkeypatch)
    assert cli.main(["data"]) == 1
    err = capsys.readouterr().err
    assert "JAXUNLEARN_DATA is not set" in err and "--data sample" in err
    assert cli.main(["data", "--data", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_import_does_not_load_tensorflow():
    import subprocess
    code = "import sys, jaxunlearn.data; print('tensorflow_datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(data.__file__).parents[1])
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- tensorflow-datasets

def test_tfds_not_installed(monkeypatch):
    no_tfds(monkeypatch)
    with pytest.raises(data.DataError, match=r"pip install 'jaxunlearn\[tfds\]'"):
        data.load_tfds()


def test_host_check_fails_fast_and_succeeds_on_loopback():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert data._host_reachable(server.getsockname(), timeout=3)
        port = server.getsockname()[1]
    timeouts = []
    connect = socket.create_connection

    def recorded(address, timeout=None, *args, **kwargs):
        timeouts.append(timeout)
        return connect(address, timeout, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "create_connection", recorded)
        assert not data._host_reachable(("127.0.0.1", port), timeout=3)
    assert timeouts == [3]  # one attempt, bounded by the timeout asked for


class FakeBuilder:
    """Stands in for a tfds cifar10 builder (CI has no tensorflow-datasets)."""

    def __init__(self, part: data.Dataset, prepared=True, array_record=True):
        self.data_dir = "/fake/tfds/cifar10"
        self.prepared, self.array_record = prepared, array_record
        self.downloads = []
        rng = np.random.default_rng(0)
        self.rows = {}
        for split in ("train", "test"):
            images, labels = getattr(part, f"{split}_images"), getattr(part, f"{split}_labels")
            order = rng.permutation(len(labels))  # tfds stores examples shuffled
            self.rows[split] = [{"id": f"{split}_{i:05d}".encode(), "image": images[i],
                                 "label": int(labels[i])} for i in order]

    def is_prepared(self):
        return self.prepared

    def download_and_prepare(self, **kwargs):
        self.downloads.append(kwargs)

    def as_data_source(self, split):
        if not self.array_record:
            raise NotImplementedError("tfrecord")

        class Source(list):
            def __getitems__(self, keys):
                return [self[k] for k in keys]
        return Source(self.rows[split])

    def as_dataset(self, split, batch_size):
        raise ModuleNotFoundError("No module named 'tensorflow'")


@pytest.fixture
def fake_tfds(monkeypatch, synthetic):
    """Installs a fake tensorflow_datasets module; returns a function that sets its builder."""
    module = types.ModuleType("tensorflow_datasets")
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", module)
    monkeypatch.delenv(data.ENV_VAR, raising=False)

    def use(**kwargs):
        builder = FakeBuilder(synthetic.limit(30, 10), **kwargs)
        module.builder = lambda name, data_dir=None: builder
        return builder
    return use


def test_tfds_data_source_in_file_order_and_auto_mode(fake_tfds, synthetic):
    fake_tfds()
    loaded = data.load_tfds()
    assert loaded.kind == "tfds" and "/fake/tfds" in loaded.source
    assert_same(loaded, synthetic.limit(30, 10))
    assert data.load_dataset(None).kind == "tfds"  # prepared in the default folder: auto uses it


def test_tfds_tfrecord_without_tensorflow(fake_tfds):
    fake_tfds(array_record=False)
    with pytest.raises(data.DataError, match="TensorFlow"):
        data.load_tfds()


def test_tfds_download_checks_first(fake_tfds, monkeypatch):
    builder = fake_tfds(prepared=False)
    with pytest.raises(data.DataError, match="no prepared cifar10"):
        data.load_tfds(download=False)
    with pytest.raises(data.DataError, match="no prepared cifar10"):
        data.load_dataset(None)  # auto mode never downloads
    monkeypatch.setattr(data, "_has_tensorflow", lambda: False)
    with pytest.raises(data.DataError, match="pip install tensorflow"):
        data.load_tfds(download=True)
    monkeypatch.setattr(data, "_has_tensorflow", lambda: True)
    monkeypatch.setattr(data, "_host_reachable", lambda *a, **k: False)
    with pytest.raises(data.DataError, match="cannot reach www.cs.toronto.edu"):
        data.load_dataset("tfds")
    assert builder.downloads == []
    monkeypatch.setattr(data, "_host_reachable", lambda *a, **k: True)
    data.load_tfds(download=True)
    assert builder.downloads == [{"file_format": "array_record"}]


def test_tfds_unprepared_is_a_quick_error(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(data.DataError, match="no prepared cifar10"):
        data.load_tfds(data_dir=str(tmp_path), download=False)
    monkeypatch.setattr(data, "_has_tensorflow", lambda: True)
    monkeypatch.setattr(data, "_host_reachable", lambda *a, **k: False)
    with pytest.raises(data.DataError, match="cannot reach"):
        data.load_tfds(data_dir=str(tmp_path), download=True)


def test_tfds_prepared_array_record_in_file_order(tmp_path, synthetic):
    """A genuine array_record cifar10 folder (PNG bytes, so no TensorFlow is needed)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    image_lib = pytest.importorskip("PIL.Image")
    from tensorflow_datasets.image_classification.cifar import Cifar10

    def png(array):
        buffer = io.BytesIO()
        image_lib.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    part = synthetic.limit(40, 12)

    class LocalCifar10(Cifar10, skip_registration=True):
        name = "cifar10"

        def _split_generators(self, dl_manager):
            self.info.features["label"].names = list(data.CLASS_NAMES)
            return {"train": self._examples("train_", part.train_images, part.train_labels),
                    "test": self._examples("test_", part.test_images, part.test_labels)}

        def _examples(self, prefix, images, labels):
            for i, (image, label) in enumerate(zip(images, labels, strict=True)):
                yield i, {"id": f"{prefix}{i:05d}", "image": png(image), "label": int(label)}

    LocalCifar10(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    loaded = data.load_tfds(data_dir=str(tmp_path))
    assert loaded.kind == "tfds"
    assert_same(loaded, part)
    assert tfds.builder("cifar10", data_dir=str(tmp_path)).is_prepared()


# ---------------------------------------------------------------- real CIFAR-10

def test_real_counts_and_statistics(real):
    assert (real.n_train, real.n_test) == (50_000, 10_000)
    assert np.all(np.bincount(real.train_labels, minlength=10) == 5_000)
    assert np.all(np.bincount(real.test_labels, minlength=10) == 1_000)
    values = np.arange(256) / 255.0
    for c in range(3):  # exact moments from the value histogram
        hist = np.bincount(real.train_images[..., c].ravel(), minlength=256) / (50_000 * 1024)
        mean = hist @ values
        std = np.sqrt(hist @ (values - mean) ** 2)
        assert mean == pytest.approx(data.CIFAR10_MEAN[c], abs=1e-6)
        assert std == pytest.approx(data.CIFAR10_STD[c], abs=1e-6)


def test_real_archive_matches_folder(real_dir, real, tmp_path):
    archive = write_tar_gz(real_dir, tmp_path / "cifar-10-binary.tar.gz", "cifar-10-batches-bin")
    loaded = data.load_dataset(str(archive))
    assert loaded.kind == "binary-archive"
    assert_same(loaded, real)


def test_real_python_layout_matches_binary(real, tmp_path):
    write_python_folder(real, tmp_path / "cifar-10-batches-py", "py2")
    loaded = data.load_dataset(str(tmp_path))
    assert loaded.kind == "python"
    assert_same(loaded, real)
