"""benchmarks/bench_model.py (issue 8) runs end to end on the CPU with --small and writes a complete JSON."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_model.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_model", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _result(out: Path):
    files = sorted(out.glob("bench_model-*.json"))
    assert len(files) == 1, files
    return files[0], json.loads(files[0].read_text())


def test_small_cpu_run(bench, tmp_path, capsys):
    assert bench.main(["--device", "cpu", "--small", "--out", str(tmp_path)]) == 0
    path, res = _result(tmp_path)
    assert path.name.startswith("bench_model-cpu-") and path.name.endswith("-small.json")
    for k in ("device", "torch", "date", "rows_planned", "precision_notes", "target_checks", "rows"):
        assert k in res
    assert res["rows_planned"] == ["concat:fp32", "concat:bf16", "fused:bf16"]
    rows = {(r["model"], r["row"], r["task"]): r for r in res["rows"]}
    want = {(m, row, t) for m in bench.MODELS for row in bench.DEFAULT_ROWS for t in bench.TASKS}
    assert set(rows) == want and len(res["rows"]) == len(want)
    for key, r in rows.items():
        assert not r.get("error"), (key, r.get("error"))
        assert r["ms"] > 0 and r["fps"] > 0, key
        assert r["output_finite"], key
        kind, batch, h, w = bench.SMALL_TASKS[r["task"]]
        assert r["input"] == f"{batch}x3x{h}x{w}" and r["output"] == f"{batch}x3x{4 * h}x{4 * w}"
        if r["backend"] == "fused":
            assert r["speedup_vs_concat_fp32"] > 0 and r["speedup_vs_concat_bf16"] > 0
        if kind == "infer":  # same seed, same weights: every row computes the same function
            bound = 0 if r["precision"] == "fp32" else 2e-2
            assert 0 <= r["rel_l2_vs_fp32"] <= bound, key
    for m in bench.MODELS:
        assert res["target_checks"][f"{m}_train_step_fused_over_concat"]["ratio"] > 0
    assert res["target_checks"]["sst_infer_720p_ms"]["target"] == 33.0
    table = capsys.readouterr().out
    assert "concat:fp32" in table and "wrote" in table


def test_compile_row(bench, tmp_path):
    pytest.importorskip("torch._inductor")
    out = tmp_path / "c.json"
    rc = bench.main(["--device", "cpu", "--small", "--models", "sst_light", "--tasks", "infer_720p", "--rows",
                     "concat:fp32", "--compile", "--iters", "1", "--warmup", "0", "--out", str(out)])
    res = json.loads(out.read_text())
    by = {r["row"]: r for r in res["rows"]}
    assert rc == 0, [r.get("error") for r in res["rows"]]
    assert set(by) == {"concat:fp32", "fused:bf16:compile"}
    assert by["fused:bf16:compile"]["compile_s"] > 0 and by["fused:bf16:compile"]["rel_l2_vs_fp32"] <= 2e-2


def test_row_specs(bench):
    assert bench.parse_row("fused:bf16") == ("fused", "bf16", "eager")
    assert bench.parse_row("concat:amp:compile") == ("concat", "amp", "compile")
    for bad in ("fused", "flash:bf16", "fused:fp16", "fused:bf16:jit"):
        with pytest.raises(SystemExit):
            bench.parse_row(bad)
    a = bench.main.__globals__["argparse"].Namespace(rows=None, compile=True, cuda_graph=True, backends="fused",
                                                     precisions=None)
    assert bench.plan_rows(a) == [("fused", "bf16", "eager"), ("fused", "bf16", "compile"),
                                  ("fused", "bf16", "graph")]


def test_failed_row_is_recorded(bench, tmp_path, monkeypatch):
    real = bench.run_row

    def flaky(preset, backend, *args):
        if backend == "concat":
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(preset, backend, *args)

    monkeypatch.setattr(bench, "run_row", flaky)
    out = tmp_path / "x.json"
    rc = bench.main(["--device", "cpu", "--small", "--models", "sst_light", "--tasks", "infer_720p",
                     "--iters", "1", "--warmup", "0", "--out", str(out)])
    assert rc == 1
    res = json.loads(out.read_text())
    by = {r["row"]: r for r in res["rows"]}
    assert by["fused:bf16"]["ms"] > 0 and not by["fused:bf16"].get("error")
    assert "rel_l2_vs_fp32" not in by["fused:bf16"]  # its reference row failed
    for name in ("concat:fp32", "concat:bf16"):
        assert by[name]["ms"] is None and "out of memory" in by[name]["error"]
