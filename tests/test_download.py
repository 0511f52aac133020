"""`jaxunlearn data --download` against a loopback HTTP server (never the internet)."""

import hashlib
import http.server
import threading
import socket

import numpy as np
import pytest

from jaxunlearn import cli, data, download
from test_data import BIN_FILES, synthetic_records, write_tar_gz


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    folder = tmp_path_factory.mktemp("archive") / "cifar-10-batches-bin"
    folder.mkdir()
    for i, name in enumerate(BIN_FILES):
        synthetic_records(i).tofile(folder / name)
    path = write_tar_gz(folder, folder.parent / "cifar-10-binary.tar.gz", "cifar-10-batches-bin")
    payload = path.read_bytes()
    return payload, hashlib.md5(payload).hexdigest()


@pytest.fixture(scope="module")
def server(archive):
    payload, _ = archive
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            body = payload[:len(payload) // 2] if self.path == "/cut" else payload
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))  # /cut: promises it all
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", requests
    httpd.shutdown()


def _left(folder):
    return sorted(p.name for p in folder.iterdir() if p.name != ".download.lock")


def test_download_checks_unpacks_and_is_reused(tmp_path, server, archive):
    url, requests = server
    folder = download.download(tmp_path, f"{url}/cifar-10-binary.tar.gz", archive[1],
                               log=lambda s: None)
    assert folder == tmp_path / "cifar-10-batches-bin" and (folder / download.MARKER).is_file()
    assert _left(tmp_path) == ["cifar-10-batches-bin"]  # the archive is gone once unpacked
    ds = data.load_binary(folder)
    assert ds.n_train == 50_000 and ds.n_test == 10_000
    np.testing.assert_array_equal(ds.train_labels[:5], [0, 7, 4, 1, 8])
    before = len(requests)
    assert download.download(tmp_path, f"{url}/cifar-10-binary.tar.gz", archive[1],
                             log=lambda s: None) == folder
    assert len(requests) == before  # a second call downloads nothing


def test_a_checksum_mismatch_is_refused_and_nothing_kept(tmp_path, server):
    url, _ = server
    with pytest.raises(data.DataError, match="does not match the published checksum"):
        download.download(tmp_path, f"{url}/cifar-10-binary.tar.gz", "0" * 32,
                          log=lambda s: None)
    assert _left(tmp_path) == [] and download.cached(tmp_path) is None


def test_an_interrupted_transfer_never_looks_complete_and_restarts(tmp_path, server, archive):
    url, _ = server
    with pytest.raises(data.DataError, match="stopped after"):
        download.download(tmp_path, f"{url}/cut", archive[1], log=lambda s: None)
    assert _left(tmp_path) == [] and download.cached(tmp_path) is None
    (tmp_path / "cifar-10-batches-bin").mkdir()  # an unpack that stopped: no marker
    (tmp_path / "cifar-10-batches-bin" / "data_batch_1.bin").write_bytes(b"x")
    assert download.cached(tmp_path) is None
    folder = download.download(tmp_path, f"{url}/cifar-10-binary.tar.gz", archive[1],
                               log=lambda s: None)
    assert download.cached(tmp_path) == folder
    assert (folder / "data_batch_1.bin").stat().st_size == 30_730_000


def test_offline_fails_at_the_first_bounded_connection_naming_the_other_sources(
        tmp_path, monkeypatch):
    attempts = []
    connect = socket.create_connection

    def recorded(address, timeout=None, *args, **kwargs):
        attempts.append(timeout)
        return connect(address, timeout, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", recorded)
    with pytest.raises(data.DataError, match="Offline.*--data PATH.*--data sample"):
        download.download(tmp_path, "http://127.0.0.1:9/cifar-10-binary.tar.gz",
                          log=lambda s: None)
    # one connection attempt, with a timeout of seconds: no retry, no unbounded wait
    assert len(attempts) == 1 and 0 < attempts[0] <= 5 and _left(tmp_path) == []


def test_the_cli_downloads_into_the_cache_where_cifar10_is_found(tmp_path, server, archive,
                                                                 monkeypatch, capsys):
    url, _ = server
    monkeypatch.setenv("JAXUNLEARN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(download, "URL", f"{url}/cifar-10-binary.tar.gz")
    monkeypatch.setattr(download, "MD5", archive[1])
    with pytest.raises(data.DataError, match="jaxunlearn data --download"):
        data.load_dataset("cifar10")
    assert cli.main(["data", "--download"]) == 0
    assert "--data cifar10" in capsys.readouterr().out
    assert download.cached() == tmp_path / "cache" / "cifar10" / "cifar-10-batches-bin"
    assert data.load_dataset("cifar10").kind == "binary"
