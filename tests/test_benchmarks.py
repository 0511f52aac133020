"""The benchmark scripts run end to end at tiny sizes and write the JSON they promise."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxunlearn import xla_options

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import benchlib  # noqa: E402
import retrain_cost  # noqa: E402
import throughput  # noqa: E402
import unlearn_latency  # noqa: E402

TINY = ["--batch", "4", "--steps", "2", "--n-data", "64"]
RECORD_KEYS = {"command", "date", "device", "versions", "rows"}
ROW_KEYS = {"impl", "model", "stem", "precision", "members", "strategy", "batch", "augment",
            "status", "step_s_median", "step_s_min", "step_s_max", "member_images_per_s",
            "compile_s", "first_step_s", "xla_step_bytes", "peak_bytes", "peak_memory",
            "peak_scope"}


def _record(path):
    record = json.loads(pathlib.Path(path).read_text())
    assert RECORD_KEYS <= set(record)
    assert record["versions"]["jax"] and record["versions"]["python"]
    assert record["device"]["platform"] and record["device"]["count"] >= 1
    return record


def test_grid_rules():
    cells = throughput.grid(["tiny:cifar"], ["resnet152:cifar:bf16"], [1, 2, 5], [1],
                            ["vmap", "map", "hybrid:5"], ["fp32", "bf16"], batch=4, steps=1,
                            augment=False, n_data=64, torch=True)
    got = {(c.impl, c.model, c.precision, c.members, c.strategy) for c in cells}
    # One member: the plain model (unroll) only. hybrid:5 only where 5 divides the member count.
    assert ("jax", "tiny", "fp32", 1, "unroll") in got
    assert ("jax", "tiny", "fp32", 1, "map") not in got
    assert ("jax", "tiny", "fp32", 2, "hybrid:5") not in got
    assert ("jax", "tiny", "bf16", 5, "hybrid:5") in got
    # A pinned precision ignores --precisions; single models run at --single-members only.
    assert {(c.precision, c.members) for c in cells if c.model == "resnet152"} == {("bf16", 1)}
    assert ("torch", "tiny", "fp32", 2, "sequential/channels_last") in got
    assert ("torch", "tiny", "fp32", 2, "sequential/nchw") in got
    assert len(cells) == len(set(cells))
    with pytest.raises(ValueError, match="resnet19"):
        throughput.parse_model("resnet19:cifar", ["fp32"])


def test_failure_status_names_oom():
    assert benchlib.failure_status(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while "
                                                "trying to allocate 9 GiB")) == "OOM"
    assert benchlib.failure_status(ValueError("bad\nmore")) == "error: ValueError: bad"


def test_throughput_in_process(tmp_path):
    out = tmp_path / "t.json"
    assert throughput.main(["--models", "tiny:cifar", "--members", "1", "2", "--strategies",
                            "vmap", "hybrid:5", "--no-isolate", "--out", str(out)] + TINY) == 0
    record = _record(out)
    rows = record["rows"]
    assert [(r["members"], r["strategy"]) for r in rows] == [(1, "unroll"), (2, "vmap")]
    for r in rows:
        assert r["status"] == "ok", r["status"]
        assert ROW_KEYS <= set(r)
        assert r["member_images_per_s"] > 0 and r["step_s_median"] > 0
        assert r["peak_bytes"] > 0 and r["peak_scope"].startswith("process")

    # A second run skips what the first measured.
    again = tmp_path / "again.json"
    throughput.main(["--models", "tiny:cifar", "--members", "1", "--strategies", "vmap",
                     "--no-isolate", "--skip-done", str(out), "--out", str(again)] + TINY)
    assert json.loads(again.read_text())["rows"] == []


def test_pipeline_row_in_own_process(tmp_path):
    out = tmp_path / "p.json"
    throughput.main(["--models", "tiny:cifar", "--members", "2", "--strategies", "vmap",
                     "--pipeline", "--out", str(out)] + TINY)
    (row,) = _record(out)["rows"]
    assert row["status"] == "ok", row["status"]
    assert row["impl"] == "pipeline" and row["augment"] is True
    assert row["member_images_per_s"] > 0 and row["synthetic_member_images_per_s"] > 0
    expected = 100 * (row["step_s_median"] / row["synthetic_step_s_median"] - 1)
    assert row["pipeline_overhead_pct"] == pytest.approx(expected)
    assert row["peak_scope"] == "row" and row["peak_bytes"] > 0


def test_torch_rows_without_torch(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_reference", None)  # import now fails
    out = tmp_path / "t.json"
    throughput.main(["--models", "tiny:cifar", "--members", "1", "--strategies", "vmap",
                     "--torch", "--no-isolate", "--out", str(out)] + TINY)
    rows = _record(out)["rows"]
    assert [r["status"] for r in rows if r["impl"] == "torch"] == ["torch not installed"] * 2
    assert [r["status"] for r in rows if r["impl"] == "jax"] == ["ok"]


def test_torch_reference(tmp_path):
    pytest.importorskip("torch")
    import torch_reference

    assert torch_reference.count_params(torch_reference.make_model("resnet18")) == 11_181_642
    assert torch_reference.count_params(torch_reference.make_model("resnet152")) == 58_164_298
    row = torch_reference.measure("tiny", "cifar", members=2, precision="fp32", batch=4,
                                  steps=2)
    assert row["member_images_per_s"] > 0 and row["peak_bytes"] > 0
    out = tmp_path / "r.json"
    assert torch_reference.main(["--model", "tiny", "--members", "1", "--batch", "2",
                                 "--steps", "1", "--precision", "bf16", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "ok" and row["strategy"] == "sequential"


def test_torch_air_net_mirrors_the_flax_one():
    pytest.importorskip("torch")
    import torch_reference
    from jaxunlearn.models import count_params, make_model

    for name in ("air-s", "air-m"):
        model = make_model(name)
        params = jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0),
                                                       np.zeros((1, 32, 32, 3), np.float32)))
        assert torch_reference.count_params(torch_reference.make_model(name)) == \
            count_params(params["params"])
    row = torch_reference.measure("air-s", "cifar", members=1, precision="fp32", batch=4,
                                  steps=1, optimizer="sgd", label_smoothing=0.2,
                                  memory_format="nchw", threads=1)
    assert row["memory_format"] == "nchw" and row["torch_threads"] == 1
    with pytest.raises(ValueError, match="memory format"):
        torch_reference.measure("air-s", "cifar", 1, "fp32", 4, 1, memory_format="nhwc")


def test_unlearn_latency(tmp_path):
    out = tmp_path / "u.json"
    assert unlearn_latency.main(["--model", "tiny", "--stem", "cifar", "--members", "3",
                                 "--strategies", "vmap", "--batch", "4", "--samples", "10",
                                 "--epochs", "2", "--steps", "2", "--repeats", "2",
                                 "--n-data", "64", "--out", str(out)]) == 0
    record = _record(out)
    (row,) = record["rows"]
    assert row["status"] == "ok", row["status"]
    assert row["unlearn_s"] > 0 and 1 <= row["invalid_members"] <= 3
    assert row["steps_per_epoch"] == 3 and row["retrain_s"] > 0
    assert row["total_s"] == pytest.approx(row["unlearn_s"] + row["retrain_s"])
    assert "formula" in record


def test_run_gpu_script_parses():
    subprocess.run(["bash", "-n", str(BENCHMARKS / "run_gpu.sh")], check=True)


@pytest.mark.slow
def test_run_gpu_quick(tmp_path):
    """The whole GPU script at tiny sizes on the CPU (about 1 min on 2 cores)."""
    env = {**os.environ, "QUICK": "1", "QUICK_MODEL": "tiny", "OUT": str(tmp_path)}
    subprocess.run(["bash", str(BENCHMARKS / "run_gpu.sh")], check=True, env=env)
    (run,) = tmp_path.iterdir()
    names = {p.stem for p in run.glob("*.json")}
    assert {"targets_r18_imagenet_fp32", "pipeline_r18_cifar_bf16", "unlearn_latency",
            "grid_r18", "resnet152"} <= names
    for path in run.glob("*.json"):
        for row in json.loads(path.read_text())["rows"]:
            assert row["status"] in ("ok", "torch not installed"), (path.name, row["status"])


def test_retrain_cost(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert retrain_cost.main(["--model", "tiny", "--stem", "cifar", "--members", "3",
                              "--policies", "ones", "full", "--batch", "4", "--samples", "8",
                              "--repeats", "1", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert {"command", "date", "device", "versions"} <= set(record)
    for policy in ("ones", "full"):
        assert set(record["seconds"][policy]) == {"1", "2", "3"}
        assert all(s > 0 for s in record["seconds"][policy].values())
    from jaxunlearn import ensemble

    assert record["layout"]["ones"] == ensemble.resolve_layout("auto", arch="tiny",
                                                               stem="cifar", members=3)
    assert "k=3 s (/ all 3)" in capsys.readouterr().out


def test_lr_sweep(tmp_path, capsys):
    import lr_sweep

    out = tmp_path / "s.json"
    assert lr_sweep.main(["--model", "tiny", "--lrs", "0.1", "0.02", "--n-train", "40",
                          "--n-test", "20", "--epochs", "1", "--batch", "20", "--layout",
                          "unroll", "--out", str(out)]) == 0
    record = _record(out)
    assert [r["learning_rate"] for r in record["rows"]] == [0.1, 0.02]
    for row in record["rows"]:  # the same member, data order and values on both sides
        assert row["max_param_difference"] < 1e-4
        assert abs(row["stacked_test_accuracy"] - row["separate_test_accuracy"]) <= 0.05
    assert record["stacked"]["seconds"] > 0 and record["separate"]["seconds"] > 0
    assert "one stacked run" in capsys.readouterr().out


def test_auto_layouts_are_the_fastest_measured():
    """`auto` on a CPU picks, for every measured model, stem and member count, the layout the
    committed benchmark JSON found fastest."""
    from jaxunlearn import ensemble

    measured = {}
    for path in sorted((BENCHMARKS / "results").glob("cpu_layouts_*.json")):
        for row in json.loads(path.read_text())["rows"]:
            if row["status"] == "ok" and row["members"] > 1 and row["strategy"] != "auto":
                key = (row["model"], row["stem"], row["members"])
                measured.setdefault(key, {})[row["strategy"]] = row["member_images_per_s"]
    assert len(measured) >= 5
    for (model, stem, members), rates in measured.items():
        fastest = max(rates, key=rates.get)
        assert ensemble.resolve_layout("auto", "cpu", model, stem, members) == fastest, (
            model, stem, members, rates)


def test_step_profile_attributes_the_step_to_its_parts(tmp_path):
    import step_profile

    out = tmp_path / "p.json"
    assert step_profile.main(["--model", "tiny:cifar", "--batch", "8", "--steps", "2",
                              "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    parts = rec["parts_ms"]
    # The tiny ResNet's step: convolutions, BatchNorm + ReLU and the named scopes all show.
    assert {"BatchNorm + activation", "optimizer update", step_profile.CONV_BY_DIFFERENCE} \
        <= set(parts)
    assert parts[step_profile.CONV_BY_DIFFERENCE] > 0 and parts["BatchNorm + activation"] > 0
    # The parts add up to the traced step (the Eigen convolutions are its remainder).
    assert sum(parts.values()) == pytest.approx(rec["traced_step_ms"], rel=1e-6)
    assert rec["compiler_options"] == xla_options.step_compiler_options()


def test_hlo_name_stacks_follow_called_computations():
    import step_profile

    hlo = """HloModule m

%fused_computation (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %t = f32[4]{0} tanh(%p), metadata={op_name="jit(step)/jvp(Net)/BatchNorm_0/tanh"}
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  ROOT %tanh_fusion = f32[4]{0} fusion(%a), kind=kLoop, calls=%fused_computation
}
"""
    stacks = step_profile.hlo_name_stacks(hlo)
    assert stacks["tanh_fusion"] == ["jit(step)/jvp(Net)/BatchNorm_0/tanh"]
    assert step_profile.part_of("tanh_fusion", stacks) == "BatchNorm + activation"
    assert step_profile.part_of("transpose_copy_fusion.3", stacks) == step_profile.TRANSPOSES


def test_conv_kernels_and_step_variants_write_their_rows(tmp_path):
    import conv_kernels
    import step_variants

    out = tmp_path / "c.json"
    assert conv_kernels.main(["--batch", "2", "--repeats", "1", "--layers", "2",
                              "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    impls = {r["impl"] for r in rec["rows"]}
    assert {"xla (library options)", "xla defaults (YNNPACK)"} <= impls
    assert all(r["ms"][k] > 0 for r in rec["rows"] for k in conv_kernels.KINDS)
    assert len(rec["rows"]) == 2 * len(impls)

    out = tmp_path / "v.json"
    assert step_variants.main(["--model", "tiny:cifar", "--batch", "4", "--rounds", "1",
                               "--per-round", "2", "--out", str(out), "ynn=default",
                               "bn=autodiff+b=8"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["batch"]) for r in rows] == [("ynn=default", 4),
                                                          ("bn=autodiff+b=8", 8)]
    assert rows[0]["options"] is None or step_variants.YNN not in rows[0]["options"]
    with pytest.raises(ValueError, match="KEY=VALUE"):
        step_variants.parse("erf")
