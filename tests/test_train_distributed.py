"""Multi-process training on the CPU: examples/train.py under torchrun with 2 gloo processes and a tiny SST.

One 2-process run (global batch 4 = 2 × 2) and one single-process run with batch 4 are shared by the tests: the
loss falls, rank 0 alone writes, the replicas stay bit-identical, the ranks read disjoint shards whose union is the
single-process batch, gradient averaging makes the two runs agree, and checkpoints resume across world sizes.
"""
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rfsr_cuda.train import TrainConfig, load_training_state, train
from rfsr_cuda.train.distributed import ShardedSampleRange, rank_seed

REPO = Path(__file__).resolve().parents[1]
TINY = dict(dim=12, window_sizes=[4, 8], num_heads=[2, 2], ranks=[4, 4], n_blocks=1, exp_ratio=1.5,
            rib_hidden_dim=8, rib_n_freqs=4, upsampler_type="pixelshuffle_direct", gate_type="DWC")
STEPS = 6
DEBUG_ENV = "RFSR_TRAIN_DEBUG_DIR"


# --- sharding and seeds (no processes) ------------------------------------------------------------------------------

def test_sharded_sample_range_partitions_each_global_batch():
    one = list(ShardedSampleRange(3, 7, batch=4))
    assert one == list(range(12, 28)) and len(ShardedSampleRange(3, 7, batch=4)) == 16
    for world in (2, 4):
        shards = [list(ShardedSampleRange(3, 7, batch=4 // world, rank=r, world_size=world)) for r in range(world)]
        assert all(len(s) == 4 * 4 // world for s in shards)
        assert sorted(sum(shards, [])) == one  # disjoint, and together the 1-process sequence
        for t in range(4):  # step by step: rank r's slice of global batch t
            b = 4 // world
            assert sum((s[t * b:(t + 1) * b] for s in shards), []) == one[t * 4:(t + 1) * 4]
    assert list(ShardedSampleRange(5, 5, batch=2)) == [] and list(ShardedSampleRange(6, 5, batch=2)) == []
    with pytest.raises(ValueError):
        ShardedSampleRange(0, 1, batch=2, rank=2, world_size=2)


def test_rank_seeds_differ():
    seeds = {rank_seed(0, r, s) for r in range(4) for s in (0, 10)} | {rank_seed(1, 1, 0)}
    assert len(seeds) == 9 and all(0 <= s < 2 ** 63 for s in seeds)
    assert rank_seed(0, 1, 0) == rank_seed(0, 1, 0)


# --- runs -----------------------------------------------------------------------------------------------------------

def _texture(h, w, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    v = [0.5 + 0.3 * np.sin(rng.uniform(0.05, 0.4) * x + rng.uniform(0.05, 0.4) * y + c) for c in range(3)]
    return (np.clip(np.stack(v, -1) + rng.normal(0, 0.03, (h, w, 3)), 0, 1) * 255).round().astype(np.uint8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(data, val, out, batch, **kw):
    opts = {"preset": "sst_light", "scale": 2, "model-config": json.dumps(TINY), "data": data, "val": val,
            "steps": STEPS, "batch-size": batch, "lr-patch": 16, "lr": 2e-3, "warmup": 2, "schedule": "cosine",
            "ema-decay": 0.9, "num-workers": 0, "device": "cpu", "seed": 1, "val-every": 3, "save-every": 3,
            "log-every": 1, "out": out}
    opts.update(kw)
    args = []
    for k, v in opts.items():
        if v is not None:
            args += [f"--{k}", str(v)]
    return args + ["--no-progress"]


def _launch(args, log_dir, debug_dir, timeout):
    # faulthandler: a rank that dies by a signal leaves its Python stack in its log
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", TORCH_SHOW_CPP_STACKTRACES="1")
    if "GLOO_SOCKET_IFNAME" not in env and os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback: no need for the hostname to resolve to an interface
    env.pop(DEBUG_ENV, None)
    if debug_dir:
        env[DEBUG_ENV] = str(debug_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}"]
    if log_dir:
        cmd += ["--log-dir", str(log_dir), "--redirects", "3"]
    cmd += [str(REPO / "examples" / "train.py")] + [str(a) for a in args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _report(proc, log_dir) -> str:
    """torchrun's output and, with ``--redirects``, the tail of each rank's own stderr (why a rank died)."""
    text = proc.stdout + proc.stderr
    if log_dir and Path(log_dir).is_dir():
        for f in sorted(Path(log_dir).glob("**/stderr.log")):
            text += f"\n--- {f.relative_to(log_dir)} ---\n" + "\n".join(f.read_text().splitlines()[-60:])
    return text


_ROOT_SIGNAL = re.compile(r"Root Cause.*?exitcode\s*:\s*-(\d+)", re.S)


def _torchrun(args, log_dir=None, debug_dir=None, timeout=120, reset=None, check=True):
    """Run examples/train.py on 2 gloo processes; with ``check``, fail the test unless it exits 0.

    A run whose first failing rank was killed by a signal (not a Python error) is run once more, after
    ``reset()`` restores the directories it writes, with a warning that carries the first attempt's logs. Such a
    death (SIGABRT of one rank) was seen once in CI and not in 60 local runs of the same command; a second death
    in a row still fails, and the failure message carries each rank's stderr with its Python stack.
    """
    for attempt in (0, 1):
        if reset is not None:
            reset()
        for d in (log_dir, debug_dir):
            if d:
                shutil.rmtree(d, ignore_errors=True)
        proc = _launch(args, log_dir, debug_dir, timeout)
        if not check or proc.returncode == 0:
            return proc
        report = _report(proc, log_dir)
        if attempt == 0 and _ROOT_SIGNAL.search(report):
            warnings.warn(f"a 2-process run lost a rank to a signal; running it again. First attempt:\n{report}")
            continue
        pytest.fail(f"torchrun exited {proc.returncode}:\n{report}")


def _cfg(data, val, out, batch, **kw):
    base = dict(data=str(data), val=str(val) if val else None, scale=2, preset="sst_light", model_overrides=TINY,
                out=str(out), steps=STEPS, batch_size=batch, lr_patch=16, lr=2e-3, warmup=2, schedule="cosine",
                ema_decay=0.9, num_workers=0, device="cpu", seed=1, val_every=3, save_every=3, log_every=1,
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _train_in_process(cfg, debug_dir=None):
    old = os.environ.pop(DEBUG_ENV, None)
    if debug_dir:
        os.environ[DEBUG_ENV] = str(debug_dir)
    try:
        return train(cfg)
    finally:
        os.environ.pop(DEBUG_ENV, None)
        if old is not None:
            os.environ[DEBUG_ENV] = old


def _log(out):
    return [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]


def _losses(out):
    return [(r["step"], r["loss"]) for r in _log(out) if "loss" in r]


def _ckpt(out, step):
    return load_training_state(Path(out) / "checkpoints" / f"step_{step:08d}.pt")


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data, val = root / "train", root / "val"
    data.mkdir(), val.mkdir()
    Image.fromarray(_texture(72, 88, 1)).save(data / "a.png")
    Image.fromarray(_texture(64, 60, 2)).save(data / "b.png")
    Image.fromarray(_texture(50, 46, 3)).save(val / "v.png")
    two, one = root / "two", root / "one"
    proc = _torchrun(_args(data, val, two, 2), log_dir=root / "logs", debug_dir=root / "debug2",
                     reset=lambda: shutil.rmtree(two, ignore_errors=True))
    _train_in_process(_cfg(data, val, one, 4), debug_dir=root / "debug1")
    return dict(root=root, data=data, val=val, two=two, one=one, proc=proc)


def test_two_process_run_trains_and_only_rank0_writes(runs):
    two, root = runs["two"], runs["root"]
    losses = _losses(two)
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))  # one record per step: rank 1 does not log
    assert all(math.isfinite(l) for _, l in losses)
    assert losses[-1][1] < 0.7 * losses[0][1], losses
    log = _log(two)
    start = [r for r in log if r.get("event") == "start"]
    assert len(start) == 1 and start[0]["world_size"] == 2 and start[0]["global_batch"] == 4
    assert start[0]["backend"] == "gloo"
    assert [r["step"] for r in log if "val_psnr" in r] == [3, 6]
    assert all(r["images_per_s"] > 0 for r in log if "loss" in r)
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step_00000003.pt", "step_00000006.pt"]
    assert sorted(p.name for p in two.iterdir()) == ["checkpoints", "sst_light_x2.safetensors", "train_log.jsonl"]
    # console: rank 0 prints the summary, rank 1 nothing
    stdout = {p.parent.name: p.read_text() for p in (root / "logs").glob("**/attempt_0/*/stdout.log")}
    assert set(stdout) == {"0", "1"}, stdout
    assert stdout["1"] == ""
    assert "done: step 6/6" in stdout["0"] and "2 processes, global batch 4" in stdout["0"]
    assert "images/s" in stdout["0"]

    state = _ckpt(two, 6)
    assert state["world_size"] == 2 and state["batch_size"] == 2 and state["global_batch"] == 4
    assert state["step"] == 6 and state["scheduler"]["last_epoch"] == 6
    assert not any(k.startswith("module.") for k in state["model"])
    assert state["ema"] is not None and len(state["rng_ranks"]) == 2
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])  # own seeds per rank


def test_replicas_stay_identical(runs):
    root, two = runs["root"], runs["two"]
    digests = [r["weights_sha256"] for r in _log(two) if r.get("event") == "checkpoint"]
    assert len(digests) == 2 and all(len(d) == 2 and d[0] == d[1] for d in digests)
    ranks = [json.loads((root / "debug2" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"] == digests[-1][0]
    assert digests[0][0] != digests[1][0]


def test_ranks_read_disjoint_shards_of_the_single_process_stream(runs):
    root = runs["root"]
    r0, r1 = (json.loads((root / "debug2" / f"rank{r}.json").read_text())["batches"] for r in (0, 1))
    single = json.loads((root / "debug1" / "rank0.json").read_text())["batches"]
    assert len(r0) == len(r1) == len(single) == STEPS
    for t in range(STEPS):
        assert len(r0[t]) == len(r1[t]) == 2 and not set(r0[t]) & set(r1[t])
        assert r0[t] + r1[t] == single[t]  # rank 0 the first half of the global batch, rank 1 the second


def test_gradient_averaging_matches_one_process_with_the_global_batch(runs):
    two, one = runs["two"], runs["one"]
    l2, l1 = _losses(two), _losses(one)
    assert [s for s, _ in l1] == [s for s, _ in l2]
    assert l2[0][1] == pytest.approx(l1[0][1], rel=1e-6)  # same samples, same initial weights
    np.testing.assert_allclose([l for _, l in l2], [l for _, l in l1], rtol=1e-4)
    a, b = _ckpt(two, 6), _ckpt(one, 6)
    assert _max_diff(a["model"], b["model"]) < 1e-5  # not bit-equal: the reductions sum in another order
    assert _max_diff(a["ema"], b["ema"]) < 1e-5
    psnr = [[r["val_psnr"] for r in _log(o) if "val_psnr" in r][-1] for o in (two, one)]
    assert psnr[0] == pytest.approx(psnr[1], abs=1e-3)


def test_two_process_checkpoint_resumes_on_one_process(runs, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(runs["two"] / "checkpoints" / "step_00000003.pt", tmp_path / "checkpoints")
    result = train(_cfg(runs["data"], runs["val"], tmp_path, 4, resume="auto"))
    assert [s for s, _ in result["losses"]] == [4, 5, 6]
    change = [r for r in _log(tmp_path) if r.get("event") == "resume_layout_change"]
    assert len(change) == 1 and change[0]["saved_world_size"] == 2 and change[0]["world_size"] == 1
    assert change[0]["saved_global_batch"] == change[0]["global_batch"] == 4
    a, b = _ckpt(tmp_path, 6), _ckpt(runs["two"], 6)
    assert a["world_size"] == 1 and a["rng_ranks"] is None
    assert _max_diff(a["model"], b["model"]) < 1e-5 and _max_diff(a["ema"], b["ema"]) < 1e-5
    assert a["scheduler"] == b["scheduler"]


def _resume_dir(out: Path, ckpt: Path):
    """A callable that makes ``out`` hold only ``ckpt`` (the state a resumed run starts from)."""
    def reset():
        shutil.rmtree(out, ignore_errors=True)
        (out / "checkpoints").mkdir(parents=True)
        shutil.copy(ckpt, out / "checkpoints")
    return reset


def test_one_process_checkpoint_resumes_on_two_processes(runs, tmp_path):
    out = tmp_path / "out"
    proc = _torchrun(_args(runs["data"], None, out, 2, resume="auto", **{"val-every": 0}),
                     reset=_resume_dir(out, runs["one"] / "checkpoints" / "step_00000003.pt"))
    assert "resuming step 3 of a 1-process run (batch 4 per process, global 4) on 2 processes" in proc.stdout
    assert [s for s, _ in _losses(out)] == [4, 5, 6]
    a, b = _ckpt(out, 6), _ckpt(runs["one"], 6)
    assert a["world_size"] == 2
    assert _max_diff(a["model"], b["model"]) < 1e-5 and _max_diff(a["ema"], b["ema"]) < 1e-5


def test_two_process_resume_is_exact(runs, tmp_path):
    out = tmp_path / "out"
    proc = _torchrun(_args(runs["data"], None, out, 2, resume="auto", **{"val-every": 0}),
                     reset=_resume_dir(out, runs["two"] / "checkpoints" / "step_00000003.pt"))
    assert "resuming" not in proc.stdout  # same layout: nothing to report
    a, b = _ckpt(out, 6), _ckpt(runs["two"], 6)
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    for i, st in a["optimizer"]["state"].items():
        assert torch.equal(st["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"])
    for r in (0, 1):
        assert torch.equal(a["rng_ranks"][r]["torch"], b["rng_ranks"][r]["torch"])


def test_changed_global_batch_warns_and_continues(runs, tmp_path):
    ckpt = runs["two"] / "checkpoints" / "step_00000003.pt"
    with pytest.warns(UserWarning, match="global batch changed from 4 to 2"):
        result = train(_cfg(runs["data"], None, tmp_path, 2, resume=str(ckpt), steps=5, save_every=0))
    assert [s for s, _ in result["losses"]] == [4, 5]
    assert _ckpt(tmp_path, 5)["global_batch"] == 2


def test_a_failing_rank_ends_the_run(runs, tmp_path):
    """Rank 0 fails alone (its validation folder is missing) while rank 1 waits in a collective: torchrun ends both."""
    proc = _torchrun(_args(runs["data"], tmp_path / "missing", tmp_path / "out", 2), timeout=90, check=False)
    assert proc.returncode != 0
    assert "missing" in proc.stderr
