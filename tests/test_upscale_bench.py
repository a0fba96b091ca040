"""benchmarks/bench_upscale.py runs on the CPU with a small size and writes one JSON row per --tile setting."""
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_upscale.py"


def test_small_cpu_run(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_upscale", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "res"
    argv = ["--device", "cpu", "--size", "160x72", "--scale", "2", "--n-blocks", "1", "--tile", "64", "auto", "0",
            "--out", str(out)]
    assert bench.main(argv) == 0
    files = list(out.glob("bench_upscale-cpu-*.json"))
    assert len(files) == 1
    res = json.loads(files[0].read_text())
    for key in ("device", "torch", "date", "preset", "scale", "input", "rows"):
        assert key in res
    assert res["input"] == "160x72" and res["weights"] == "random init" and res["n_blocks"] == 1
    tiled, auto, whole = res["rows"]
    assert tiled["tile_request"] == 64 and tiled["tile_shape"] == [128, 128] and tiled["tiles"] == 2
    assert tiled["forwards_per_run"] == 2 and tiled["tile_batch"] == 1  # CPU default: one tile per forward
    assert auto["tile_request"] == "auto" and auto["tile"] is None and whole["tiles"] == 1  # fits: one piece
    for row in res["rows"]:
        assert row["output"] == "320x144" and row["seconds"] > 0 and row["peak_host_rss_mib"] > 0
        assert "peak_allocated_mib" not in row  # CPU: no device memory to report
    assert "--tile 64: 128x128 tiles (overlap 64), 2 tile(s) in 2 forward(s), float32 (as given)" in capsys.readouterr().out
    assert all(row["route"] == "default" and row["prepared"] is False for row in res["rows"])
