"""Runs a small experiment with the member axis sharded over devices (and processes), for
tests/test_sharding.py, which starts it in a subprocess with fake CPU devices.

    python tests/multidevice_worker.py OUT_DIR DEVICES [COORDINATOR NUM_PROCESSES PROCESS_ID]
    python tests/multidevice_worker.py unlearn-check
    python tests/multidevice_worker.py substack-check
    python tests/multidevice_worker.py per-member-check

The first writes OUT_DIR/run (the run folder) and OUT_DIR/params.npz (every member's
parameters) from process 0. The second checks, on 4 devices, that a sharded unlearn changes
only the shards of invalid members and equals the unsharded one; the third, that retraining 2
of 8 members sharded over 4 devices (a sub-stack of 4, padded with 2 inactive members) leaves
the others bit-identical and equals the unsharded retraining; the fourth, the same with each
member's own learning rate, momentum and weight decay. They exit non-zero otherwise.
"""

import pathlib
import sys


def main(out: str, devices: int, coordinator: str | None = None, processes: int = 1,
         process_id: int = 0) -> None:
    import jax

    if coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, processes, process_id)
    import numpy as np

    from jaxunlearn import checkpoint, data, driver
    from jaxunlearn.config import apply_overrides, get_preset

    cfg = apply_overrides(get_preset("smoke"), {
        "members": 4, "phases": 2, "baseline": "none", "eval_every_epoch": False,
        "deletion_rate": 0.02, "devices": devices})
    out = pathlib.Path(out)
    driver.train_and_evaluate(cfg, out / "run", data.load_sample(), log=lambda s: None,
                              progress=False)
    if jax.process_index() == 0:  # the checkpoint holds every process's members
        ckpts = checkpoint.Checkpoints(out / "run", read_only=True)
        tree, _ = ckpts.load(ckpts.steps()[-1])
        params = tree["groups"]["ensemble"]["state"]["params"]
        flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
        np.savez(out / "params.npz", **flat)


def unlearn_check() -> None:
    import jax
    import numpy as np

    from jaxunlearn import sharding
    from jaxunlearn.group import compile_group

    assert jax.device_count() == 4, jax.devices()
    sharded = compile_group("tiny", "cifar", "fp32", "adam", 1e-3, 0.0, "vmap", False, 4)
    single = compile_group("tiny", "cifar", "fp32", "adam", 1e-3, 0.0, "vmap", False, 1)
    key = np.asarray(jax.random.PRNGKey(0))
    state = sharded.init(key, 4)
    def shards(tree):
        return {jax.tree_util.keystr(path): {s.index[0].start: np.asarray(s.data)
                                             for s in leaf.addressable_shards}
                for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}

    before = shards(state)
    invalid = np.array([False, True, False, False])
    k_new = np.asarray(jax.random.PRNGKey(9))
    out = sharded.unlearn(k_new, state, sharding.put(invalid, sharded.mesh, sharding.MEMBERS))
    fresh_kernels = 0
    for path, members in shards(out).items():
        for member, value in members.items():
            same = np.array_equal(value, before[path][member])
            if not invalid[member]:
                assert same, f"valid member {member} changed at {path}"
            elif path.startswith(".params") and "kernel" in path:  # random init: differs
                assert not same, f"invalid member {member} kept {path}"
                fresh_kernels += 1
    assert fresh_kernels >= 3, fresh_kernels  # the tiny ResNet's convolutions and classifier
    reference = single.unlearn(k_new, single.init(key, 4), jax.numpy.asarray(invalid))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(sharding.to_host(a), np.asarray(b),
                                                         rtol=1e-6, atol=1e-7),
                 out, reference)  # tree.map: the structures must match
    print("unlearn-check ok")


def substack_check(per_member: bool = False) -> None:
    import jax
    import numpy as np

    from jaxunlearn import config, data, sharding
    from jaxunlearn.group import ModelGroup
    from jaxunlearn.stages import Stage
    from jaxunlearn.trainer import Trainer

    assert jax.device_count() == 4, jax.devices()
    ds = data.load_sample().limit(128, 8)
    arrays = (ds.train_images, ds.train_labels, ds.test_images, ds.test_labels)
    stage = Stage("ensemble", 1, 1, 1, 1, [np.arange(i * 16, i * 16 + 12) for i in range(8)],
                  None)
    chosen = np.zeros(8, bool)
    chosen[[1, 6]] = True
    trained = {}
    for devices, policy in ((4, "pow2"), (1, "full")):
        cfg = config.apply_overrides(config.get_preset("smoke"), {
            "members": 8, "model": "tiny", "stem": "cifar", "member_parallel": "vmap",
            "substacks": policy, "batch_size": 8, "epochs": 2, "devices": devices,
            "eval_every_epoch": False, "optimizer": "sgd", "learning_rate": 0.05,
            **({"learning_rate": [0.05, 0.02, 0.1, 0.05, 0.01, 0.2, 0.03, 0.05],
                "momentum": [0.9, 0.8, 0.9, 0.5, 0.9, 0.9, 0.7, 0.9],
                "weight_decay": [0.0, 1e-3, 0.0, 0.0, 5e-4, 0.0, 0.0, 1e-2]}
               if per_member else {})})
        group = ModelGroup("ensemble", "ensemble", "tiny", 8, cfg, jax.random.PRNGKey(0),
                           arrays, devices=devices)
        if devices == 4:
            assert [len(s) for s in group.substacks(chosen)] == [4]
        before = group.host_state()
        Trainer(cfg, np.zeros(128, bool)).train(group, stage, chosen)
        after = group.host_state()
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(sharding.to_host(a)[~chosen],
                                                                b[~chosen]), after, before)
        trained[devices] = after.params
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[chosen], b[chosen], rtol=1e-4,
                                                         atol=1e-5), trained[4], trained[1])
    print(f"{'per-member' if per_member else 'substack'}-check ok")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args == ["unlearn-check"]:
        unlearn_check()
        sys.exit(0)
    if args == ["substack-check"]:
        substack_check()
        sys.exit(0)
    if args == ["per-member-check"]:  # the same, each member with its own settings
        substack_check(per_member=True)
        sys.exit(0)
    main(args[0], int(args[1]), *(args[2:3]), *(int(a) for a in args[3:5]))
