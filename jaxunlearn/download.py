"""CIFAR-10 from its publisher: the official binary archive, checked and unpacked into the cache.

`download` fetches ``cifar-10-binary.tar.gz`` from the University of Toronto, checks the MD5
that its page publishes, and unpacks it into ``DIR/cifar-10-batches-bin`` (``DIR``: the user
cache's ``cifar10/`` folder, `jaxunlearn.cache`), atomically: the archive is written as
``.part`` and renamed only once its checksum matches, the folder is unpacked beside its final
place and renamed only once every batch file is there at its full size, and a ``COMPLETE``
marker is written last. A failed or interrupted download leaves nothing that looks complete,
and the next call starts it again from the beginning; a second call finds the cache and
downloads nothing. Offline, it fails within seconds, naming the other ways to provide data.

Only the standard library (`urllib`) and tqdm (for the progress bar on a terminal) are used: a
single file with a published checksum needs no more (pooch, which does this for SciPy, would
bring requests and platformdirs, and unpacks into place non-atomically).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pathlib
import shutil
import socket
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable

from jaxunlearn import cache
from jaxunlearn.cifar_format import (BATCH_BYTES, BIN_ARCHIVE, BIN_DIR, BIN_FILES,
                                     HOW_TO_PROVIDE, DataError)

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
MD5 = "c32a1d4ab5d03f1284b67883e8d87530"  # as published on https://www.cs.toronto.edu/~kriz/cifar.html
MARKER = "COMPLETE"
_CHUNK = 1 << 20


def default_dir() -> pathlib.Path:
    return cache.folder() / "cifar10"


def cached(directory=None) -> pathlib.Path | None:
    """The unpacked ``cifar-10-batches-bin`` folder in ``directory`` (default: the cache) when
    a download completed there, else None."""
    folder = pathlib.Path(directory or default_dir()).expanduser() / BIN_DIR
    return folder if (folder / MARKER).is_file() else None


def download(directory=None, url: str | None = None, md5: str | None = None,
             timeout: float = 10.0, progress: bool | None = None,
             log: Callable[[str], None] = print) -> pathlib.Path:
    """Downloads, checks and unpacks CIFAR-10 into ``directory`` (default: the cache) unless
    it is there already; returns the ``cifar-10-batches-bin`` folder. Raises DataError.
    ``url`` and ``md5`` default to the publisher's (`URL`, `MD5`)."""
    directory = pathlib.Path(directory or default_dir()).expanduser()
    url, md5 = url or URL, md5 or MD5
    found = cached(directory)
    if found is not None:
        log(f"CIFAR-10 is already in {found}")
        return found
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {directory}: {e}; pass --dir DIR") from e
    with _locked(directory):  # a second process waits, then finds the cache
        found = cached(directory)
        if found is not None:
            return found
        archive = directory / BIN_ARCHIVE
        if not archive.is_file() or _md5(archive) != md5:
            _fetch(url, md5, archive, timeout, sys.stderr.isatty() if progress is None
                   else progress, log)
        folder = _unpack(archive, directory)
        archive.unlink()
        log(f"CIFAR-10 is in {folder}")
        return folder


@contextlib.contextmanager
def _locked(directory: pathlib.Path):
    with open(directory / ".download.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _md5(path: pathlib.Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _offline(url: str, why) -> DataError:
    return DataError(f"could not download {url} ({why}). Offline? Provide CIFAR-10 another "
                     f"way, e.g. --data PATH to a copy, or --data sample for the bundled "
                     f"sample.\n" + HOW_TO_PROVIDE)


def _fetch(url: str, md5: str, archive: pathlib.Path, timeout: float, progress: bool,
           log: Callable[[str], None]) -> None:
    """Streams ``url`` into ``archive.part``, renamed to ``archive`` only if its MD5 is
    ``md5``; the part file is removed on any failure."""
    from tqdm.auto import tqdm

    host = urllib.parse.urlsplit(url)
    port = host.port or (443 if host.scheme == "https" else 80)
    try:  # fail fast where the network is closed, before urllib's longer waits
        socket.create_connection((host.hostname, port), timeout=min(timeout, 5.0)).close()
    except OSError as e:
        raise _offline(url, e) from None
    part = archive.with_name(archive.name + ".part")
    log(f"downloading {url}")
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, disable=not progress,
                      leave=False) as bar:
                for block in iter(lambda: response.read(_CHUNK), b""):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
            if total is not None and out.tell() != total:
                raise _offline(url, f"the transfer stopped after {out.tell():,} of "
                                    f"{total:,} bytes")
    except DataError:
        part.unlink(missing_ok=True)
        raise
    except (OSError, urllib.error.URLError) as e:  # includes timeouts and refused connections
        part.unlink(missing_ok=True)
        raise _offline(url, e) from None
    if digest.hexdigest() != md5:
        part.unlink(missing_ok=True)
        raise DataError(f"{url} does not match the published checksum (MD5 "
                        f"{digest.hexdigest()}, expected {md5}); nothing was kept. Try again "
                        f"later, or download it by hand and pass --data PATH")
    os.replace(part, archive)


def _unpack(archive: pathlib.Path, directory: pathlib.Path) -> pathlib.Path:
    """Unpacks ``archive`` beside ``directory/cifar-10-batches-bin``, checks it, renames it in
    place and marks it complete."""
    final = directory / BIN_DIR
    with tempfile.TemporaryDirectory(dir=directory, prefix=".unpack-") as tmp:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar.getmembers():  # only the binary layout's regular files
                    name = pathlib.PurePosixPath(member.name)
                    if member.isfile() and name.parts[:1] == (BIN_DIR,) and ".." not in name.parts:
                        tar.extract(member, tmp, set_attrs=False)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{archive} cannot be unpacked ({e}); delete it and download "
                            f"again") from e
        unpacked = pathlib.Path(tmp) / BIN_DIR
        wrong = [n for n in BIN_FILES if not (unpacked / n).is_file()
                 or (unpacked / n).stat().st_size != BATCH_BYTES]
        if wrong:
            raise DataError(f"{archive} is not the CIFAR-10 binary archive: {wrong} missing or "
                            f"of the wrong size; delete it and download again")
        (unpacked / MARKER).write_text("downloaded and checked by jaxunlearn\n")
        if final.exists():  # a folder without its marker: an earlier unpack that stopped
            shutil.rmtree(final)
        os.replace(unpacked, final)
    return final
