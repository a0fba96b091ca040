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
    for k in ("device", "torch", "date", "precision", "rows"):
        assert k in res
    assert res["precision"] == "bf16"
    rows = {(r["model"], r["backend"], r["task"]): r for r in res["rows"]}
    want = {(m, b, t) for m in bench.MODELS for b in bench.BACKENDS for t in bench.TASKS}
    assert set(rows) == want and len(res["rows"]) == len(want)
    for key, r in rows.items():
        assert not r.get("error"), (key, r.get("error"))
        assert r["ms"] > 0 and r["fps"] > 0, key
        assert r["output_finite"], key
        kind, batch, h, w = bench.SMALL_TASKS[r["task"]]
        assert r["input"] == f"{batch}x3x{h}x{w}" and r["output"] == f"{batch}x3x{4 * h}x{4 * w}"
        if r["backend"] == "fused":
            assert r["fused_over_concat_ms"] > 0
            if kind == "infer":  # same seed, same weights: both routes compute the same function
                other = rows[(r["model"], "concat", r["task"])]
                assert r["output_absmean"] == pytest.approx(other["output_absmean"], rel=1e-3)
    table = capsys.readouterr().out
    assert "fused ms" in table and "wrote" in table


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
    by = {r["backend"]: r for r in res["rows"]}
    assert by["fused"]["ms"] > 0 and not by["fused"].get("error")
    assert by["concat"]["ms"] is None and "out of memory" in by["concat"]["error"]
