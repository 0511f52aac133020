"""The member axis sharded over fake CPU devices and over two processes (subprocesses, since the
device count is fixed when JAX starts)."""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import results_of

WORKER = pathlib.Path(__file__).with_name("multidevice_worker.py")


def _run(args, devices_per_process, timeout=600):
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count="
    env = dict(os.environ, XLA_FLAGS=f"{flags}{devices_per_process}".strip())
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def _load(folder):
    results = results_of(folder / "run")
    params = np.load(folder / "params.npz")
    return results, {k: params[k] for k in params.files}, np.load(folder / "run" / "lineage.npz")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    _wait(_run([out, 1], 4))
    return _load(out)


def _assert_same_run(a, b):
    (ra, pa, la), (rb, pb, lb) = a, b
    assert len(ra["phases"]) == len(rb["phases"]) == ra["config"]["phases"]
    for x, y in zip(ra["phases"], rb["phases"]):
        assert x["deleted_ids"] == y["deleted_ids"] and x["invalidated"] == y["invalidated"]
        assert x["ensemble"]["test_accuracy"] == y["ensemble"]["test_accuracy"]
        # Float rounding only (per-device programs reassociate sums): same tolerance as params.
        assert x["ensemble"]["test_loss"] == pytest.approx(y["ensemble"]["test_loss"], rel=1e-4)
        assert len(x["members"]) == len(y["members"])
        for mx, my in zip(x["members"], y["members"]):
            assert mx["test_loss"] == pytest.approx(my["test_loss"], rel=1e-4)
    np.testing.assert_array_equal(la["lineage"], lb["lineage"])
    assert pa.keys() == pb.keys()
    for k in pa:  # per-member float reassociation only: vmap over 4 members vs 1 per device
        np.testing.assert_allclose(pa[k], pb[k], rtol=1e-4, atol=1e-4)


def test_sharded_over_four_devices_equals_single_device(tmp_path, single):
    _wait(_run([tmp_path, 4], 4))
    sharded = _load(tmp_path)
    assert sharded[0]["devices"] == 4 and single[0]["devices"] == 1
    _assert_same_run(sharded, single)


def test_two_processes_agree_with_one(tmp_path, single):
    with socket.socket() as s:  # a free port on the loopback for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [_run([tmp_path, 0, f"127.0.0.1:{port}", 2, i], 2) for i in range(2)]
    for p in procs:
        _wait(p)
    distributed = _load(tmp_path)
    assert distributed[0]["devices"] == 4 and distributed[0]["processes"] == 2
    _assert_same_run(distributed, single)


def test_sharded_unlearn_touches_only_invalid_members_shards():
    assert "unlearn-check ok" in _wait(_run(["unlearn-check"], 4))


def test_sharded_sub_stack_retrains_only_its_members():
    assert "substack-check ok" in _wait(_run(["substack-check"], 4))


def test_sharded_per_member_settings_train_each_member_as_unsharded():
    assert "per-member-check ok" in _wait(_run(["per-member-check"], 4))
