"""Many ranks with torch.distributed (gloo on the CPU): real torchrun and env-launched processes.

- a 2-rank file is bit-identical to a 1-process file (OMP_NUM_THREADS=1, fp32, the loop strategy);
- SIGKILL of a rank ends the job with one line naming it; reruns under world sizes 1 and 3 finish
  the same file with nothing recomputed; torchrun's elastic restart resumes from the file; without
  torchrun, the heartbeat ends the survivor within the timeout;
- the API from a script under torchrun, sharded data, and the data-parallel Hessian-vector product;
- bad input (other settings on one rank, NCCL without a GPU, a taken port): one line on every rank.

Small on purpose (2 cores): LeNet-BN on 64 tiny images, grids of 9x9 and 31x31.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import done_count, run_main, write_image_folder

import fastland
from fastland import api, distributed, models, surface
from fastland.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

TIMEOUT = 120  # seconds for any one launch (a hang fails the test instead of the suite)


# --- fixtures and helpers --------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint and a tiny ImageFolder (real PNGs, decoded once into a shared cache)."""
    root = tmp_path_factory.mktemp("dist")
    models.save_checkpoint(root / "ck.pt", "lenet_bn", models.randomized("lenet_bn", 0))
    write_image_folder(root / "imgs", 96)
    return root


@pytest.fixture(scope="module")
def env(work: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT", "FASTLAND_DIST", "FASTLAND_DIST_TIMEOUT")}
    return e | {"OMP_NUM_THREADS": "1", "FASTLAND_CACHE": str(work / "cache"), "PYTHONUNBUFFERED": "1"}


def args(work: Path, out: Path, res: int, *more: str) -> list[str]:
    return ["--checkpoint", str(work / "ck.pt"), "--data", f"imagefolder:{work / 'imgs'}", "--split", "test",
            "--samples", "64", "--res", str(res), "--device", "cpu", "--no-render", "--chunk", "5", "--out", str(out),
            *more]


def torchrun(env: dict[str, str], nproc: int, argv: list[str], *launcher: str, module: str = "fastland.surface",
             cwd: Path | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *launcher]
    cmd += ["-m", module, *argv] if module else argv
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def env_launch(env: dict[str, str], argvs: list[list[str]], port: int) -> list[subprocess.Popen]:
    """One process per argv with RANK/WORLD_SIZE/MASTER_* set, as Slurm's srun starts them (no torchrun)."""
    return [subprocess.Popen([sys.executable, "-m", "fastland.surface", *a], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env=env | {"RANK": str(r), "WORLD_SIZE": str(len(argvs)), "LOCAL_RANK": str(r),
                                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
            for r, a in enumerate(argvs)]


def finish(p: subprocess.Popen) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=TIMEOUT)
    return p.returncode, out, err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(path: Path, at_least: int, proc: subprocess.Popen) -> int:
    """Poll the file being written until ``at_least`` points are done (the run must still be going)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        n = done_count(path)
        if n >= at_least:
            assert proc.poll() is None, "the run ended before it could be interrupted; make the test grid larger"
            return n
        assert proc.poll() is None, f"the run ended early: {proc.communicate()}"
        time.sleep(0.01)
    raise AssertionError("no progress")


def worker_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """torchrun's worker processes by their RANK."""
    pids: dict[int, int] = {}
    for tid in os.listdir(f"/proc/{launcher.pid}/task"):
        for kid in Path(f"/proc/{launcher.pid}/task/{tid}/children").read_text().split():
            env = Path(f"/proc/{kid}/environ").read_bytes().split(b"\0")
            rank = [e for e in env if e.startswith(b"RANK=")]
            if rank:
                pids[int(rank[0][5:])] = int(kid)
    return pids


def arrays(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r", locking=False) as f:
        return {k: f[k][...] for k in ("test_loss", "test_acc", "done")}


def attrs(path: Path) -> dict[str, object]:
    return fastland.load(path).attrs


def assert_same_file(path: Path, ref: Path) -> None:
    got, want = arrays(path), arrays(ref)
    for k in want:  # bit for bit: the same float64 bytes
        assert got[k].tobytes() == want[k].tobytes(), k


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def reference(work: Path) -> dict[int, Path]:
    """1-process runs of the same commands (in this process, one thread): the files to match."""
    out = {}
    for res in (9, 31):
        out[res] = work / f"ref{res}.h5"
        code, _, err = run_main(surface.main, args(work, out[res], res), _NoCapture())
        assert code == 0, err
    return out


class _NoCapture:
    """``run_main`` wants a capsys; a module fixture has none, and the output is not needed."""

    def readouterr(self) -> tuple[str, str]:
        return "", ""


# --- no processes ----------------------------------------------------------------------------
def test_chunking_and_blocking_change_no_bit() -> None:
    """Why any world size writes the same file: with the loop strategy (default settings) a point's
    value does not depend on which other points share its chunk or block."""
    from fastland import directions
    from fastland.engine import BatchedEvaluator
    from fastland.params import FlatSpace

    model = models.randomized("lenet_bn", 1)
    g = torch.Generator().manual_seed(3)
    evalset, task, _ = api.prepare(model, (torch.randn(40, 3, 32, 32, generator=g), torch.randint(0, 10, (40,), generator=g)),
                                   None, "cpu", 16)
    space = FlatSpace(model)
    theta = space.flatten(model)
    dirs = directions.make(space, theta, 2, 0)
    x, y = np.linspace(-1, 1, 6), np.linspace(-0.7, 0.9, 5)
    idx = np.arange(30)
    ev = BatchedEvaluator(model, space, theta, dirs, evalset, task, verbose=False, strategy="loop")
    whole = ev.evaluate(api.grid_coords(idx, x, y))
    for parts in ([1] * 30, [7, 1, 13, 9], [2] * 15):
        cuts = np.cumsum([0, *parts])
        got = [ev.evaluate(api.grid_coords(idx[a:b], x, y)) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        assert torch.equal(torch.cat([g[0] for g in got]), whole[0]) and torch.equal(torch.cat([g[1] for g in got]), whole[1])
    # Points per block change nothing either (the data batch does: it is the device's, the same on every rank).
    small = BatchedEvaluator(model, space, theta, dirs, evalset, task, verbose=False, strategy="loop", block=3)
    assert torch.equal(small.evaluate(api.grid_coords(idx, x, y))[0], whole[0])


def test_helpers_round_trip_and_read_the_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    pending = np.array([0, 1, 2, 5, 9, 10, 30])
    assert distributed._runs(pending) == [[0, 3], [5, 1], [9, 2], [30, 1]]
    assert np.array_equal(distributed._unruns(distributed._runs(pending)), pending)
    loss, acc = torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) * 100
    k, rank, l2, a2, sec = distributed.unpack_result(distributed.pack_result(7, 3, loss, acc, 1.5))
    assert (k, rank, sec) == (7, 3, 1.5) and np.array_equal(l2, loss.numpy()) and np.array_equal(a2, acc.numpy())
    assert distributed.unpack_result(distributed.pack_result(0, 0, loss, None, 0.0))[3] is None
    rec = distributed.run_record({"world_sizes": [2, 1]}, {0: (10, 1.0), 1: (12, 1.1), 2: (9, 0.9)}, "gloo")
    assert rec["world_sizes"] == [2, 1, 3] and rec["last_run_ranks"][1] == {"rank": 1, "points": 12, "busy_seconds": 1.1}
    assert "1: 12 (6.0/s)" in distributed.rank_summary({**rec, "last_run_seconds": 2.0})

    assert distributed.launched() is None and distributed.current() is None
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29400")
    launch = distributed.launched()
    assert launch is not None and (launch.rank, launch.world_size, launch.local_rank) == (1, 2, 1)
    assert distributed.device_name("auto") == ("cuda:1" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("FASTLAND_DIST", "off")  # fastland on one rank alone
    assert distributed.launched() is None
    monkeypatch.delenv("FASTLAND_DIST")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(UserError, match="RANK 2 does not fit WORLD_SIZE 2"):
        distributed.launched()
    with pytest.raises(UserError, match="splits the data across the ranks"):
        monkeypatch.delenv("RANK")
        distributed.shard_data((torch.zeros(4, 1), torch.zeros(4)), True, 2, "cpu")


def test_one_process_records_its_world_size(reference: dict[int, Path]) -> None:
    a = attrs(reference[9])
    assert list(a["world_sizes"]) == [1] and a["device"] == "cpu (1 threads)"  # OMP_NUM_THREADS / one thread honoured


# --- runs on many ranks ---------------------------------------------------------------------
def test_two_ranks_write_the_file_one_process_writes(work: Path, env: dict[str, str],
                                                     reference: dict[int, Path]) -> None:
    out = work / "two.h5"
    code, stdout, err = finish(torchrun(env, 2, args(work, out, 9, "--chunk", "4")))
    assert code == 0, err
    assert_same_file(out, reference[9])
    a = attrs(out)
    assert list(a["world_sizes"]) == [2] and a["device"] == "cpu (1 threads)"  # torchrun's OMP_NUM_THREADS=1 honoured
    ranks = json.loads(a["last_run_ranks"])
    assert [r["rank"] for r in ranks] == [0, 1] and sum(r["points"] for r in ranks) == 81
    assert stdout.count("surface  ") == 1 and "ranks    2 (gloo)" in stdout  # rank 0 alone reports
    assert not error_lines(err)


def test_sigkill_then_resume_under_world_sizes_2_1_3(work: Path, env: dict[str, str],
                                                      reference: dict[int, Path]) -> None:
    out = work / "killed.h5"
    run = torchrun(env, 2, args(work, out, 31))
    wait_for(out, 100, run)
    os.kill(worker_pids(run)[1], signal.SIGKILL)
    killed = time.monotonic()
    code, _, err = finish(run)
    assert code != 0 and time.monotonic() - killed < 15  # torchrun stops rank 0 at once; it ends in seconds
    lines = error_lines(err)
    assert len(lines) == 1 and "rank 1" in lines[0] and "died" in lines[0] and "resume" in lines[0], err
    first = done_count(out)
    assert 0 < first < 961

    # World size 1, interrupted (Ctrl-C) part-way: progress kept.
    one = subprocess.Popen([sys.executable, "-m", "fastland.surface", *args(work, out, 31)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(out, first + 100, one)
    one.send_signal(signal.SIGINT)
    code, _, err = finish(one)
    assert code == 130, err
    second = done_count(out)
    assert first < second < 961

    # World size 3 finishes: the same file as one uninterrupted process, nothing computed twice.
    code, stdout, err = finish(torchrun(env, 3, args(work, out, 31)))
    assert code == 0, err
    assert_same_file(out, reference[31])
    a = attrs(out)
    assert list(a["world_sizes"]) == [2, 1, 3] and a["last_run_points"] == 961 - second
    assert "(resuming)" in stdout


def test_elastic_restart_resumes_from_the_file(work: Path, env: dict[str, str], reference: dict[int, Path]) -> None:
    out = work / "elastic.h5"
    run = torchrun(env, 2, args(work, out, 31), "--max-restarts", "1")
    wait_for(out, 100, run)
    os.kill(worker_pids(run)[1], signal.SIGKILL)
    code, _, err = finish(run)
    assert code == 0, err
    assert "torchrun restarts the job" in err
    assert_same_file(out, reference[31])
    assert list(attrs(out)["world_sizes"]) == [2, 2]


def test_without_torchrun_a_lost_peer_ends_the_job_within_the_timeout(work: Path, env: dict[str, str]) -> None:
    out = work / "env.h5"
    ranks = env_launch(env, [args(work, out, 31, "--dist-timeout", "4")] * 2, free_port())
    wait_for(out, 100, ranks[0])
    ranks[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    code, _, err = finish(ranks[0])
    took = time.monotonic() - killed
    ranks[1].wait()
    # The stated bound: 1.5 x --dist-timeout to the error line, then the process's exit (seconds on a busy 2-core box).
    assert code == 2 and took < 4 * 1.5 + 8, (took, err)
    lines = error_lines(err)
    assert len(lines) == 1 and "rank 1" in lines[0] and "stopped responding for 4 s" in lines[0], err
    assert 0 < done_count(out) < 961


SCRIPT = '''
import json, sys, numpy as np, torch, fastland
from fastland import distributed, hessian, models
model = models.randomized("lenet_bn", 2)
g = torch.Generator().manual_seed(5)
x, y = torch.randn(200, 3, 32, 32, generator=g), torch.randint(0, 10, (200,), generator=g)
kw = dict(res=5, batch_size=32, device="cpu", progress=False)
queue = fastland.surface(model, (x, y), out=sys.argv[1], **kw)        # the API under torchrun, into a file
shard = fastland.surface(model, (x, y), shard=True, **kw)             # each rank holds a third of the data
ctx = distributed.current()
v = torch.randn(3, sum(p.numel() for p in model.parameters()), generator=g)
op = hessian.operator(model, (x, y), batch_size=32)                   # data-parallel: its shard of the batches
hv = op.hvp(v)
np.savez(sys.argv[2] + f"{ctx.rank}.npz", queue=queue.loss, queue_acc=queue.acc, shard=shard.loss, shard_acc=shard.acc,
         hv=hv.numpy(), n=len(op.batches), loss=op.loss(), samples=shard.attrs["samples"])
'''


def test_api_script_sharded_data_and_data_parallel_hvp(work: Path, env: dict[str, str]) -> None:
    script = work / "script.py"
    script.write_text(SCRIPT)
    code, _, err = finish(torchrun(env, 3, [str(script), str(work / "api.h5"), str(work / "rank")], module=""))
    assert code == 0, err
    got = [np.load(work / f"rank{r}.npz") for r in range(3)]

    model = models.randomized("lenet_bn", 2)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(200, 3, 32, 32, generator=g), torch.randint(0, 10, (200,), generator=g)
    want = fastland.surface(model, (x, y), res=5, batch_size=32, device="cpu", progress=False)
    for r in got:  # every rank returns the surface; the queue changes no bit
        assert r["queue"].tobytes() == want.loss.tobytes() and r["queue_acc"].tobytes() == want.acc.tobytes()
        # Sharded: exact counts, sums over shards of fp32 batch sums (another order: ~1e-7)
        np.testing.assert_allclose(r["shard"], want.loss, rtol=1e-6, atol=0)
        assert np.array_equal(r["shard_acc"], want.acc) and int(r["samples"]) == 200
    v = torch.randn(3, sum(p.numel() for p in model.parameters()), generator=g)
    from fastland import hessian

    op = hessian.operator(model, (x, y), batch_size=32)
    hv = op.hvp(v).numpy()
    assert sorted(int(r["n"]) for r in got) == [2, 2, 3]  # 7 batches in contiguous shards
    for r in got:
        rel = np.linalg.norm(r["hv"] - hv, axis=1) / np.linalg.norm(hv, axis=1)
        assert rel.max() < 1e-6, rel  # the exact mean: n_b-weighted sums all-reduced / N, not per-rank means
        assert float(r["loss"]) == pytest.approx(op.loss(), rel=1e-6)


# --- bad input: one line on every rank --------------------------------------------------------
def test_other_settings_on_one_rank(work: Path, env: dict[str, str]) -> None:
    out = work / "mismatch.h5"
    ranks = env_launch(env, [args(work, out, 9), args(work, out, 9, "--seed", "1")], free_port())
    results = [finish(p) for p in ranks]
    for code, _, err in results:
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "rank 1 runs with other settings than rank 0 (direction_seed: 0 on rank 0, 1 on rank 1" in err
    assert not out.exists()


def test_nccl_on_a_rank_without_gpu(work: Path, env: dict[str, str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    ranks = env_launch(env, [args(work, work / "nccl.h5", 9, "--dist-backend", "nccl")] * 2, free_port())
    for code, _, err in (finish(p) for p in ranks):
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "--dist-backend nccl needs a CUDA GPU on every rank, but rank 0 has none" in err


def test_a_taken_port(work: Path, env: dict[str, str]) -> None:
    with socket.socket() as holder:  # another program listens on MASTER_PORT
        holder.bind(("127.0.0.1", 0))
        holder.listen(8)
        port = holder.getsockname()[1]
        start = time.monotonic()
        ranks = env_launch(env, [args(work, work / "port.h5", 9, "--dist-timeout", "3")] * 2, port)
        results = [finish(p) for p in ranks]
    assert time.monotonic() - start < 3 + 2 + 30  # the connect wait, the deadline's slack, two starts
    for code, _, err in results:
        assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"MASTER_PORT {port} is already in use" in results[0][2]
    assert f"rank 1 could not reach the rendezvous store at 127.0.0.1:{port} within 3 s" in results[1][2]


@pytest.mark.cuda
def test_nccl_two_ranks_on_one_gpu_each(work: Path, env: dict[str, str]) -> None:
    """On a machine with 2+ GPUs: NCCL, one rank per GPU; the file matches one process within TF32's error."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    out, ref = work / "nccl2.h5", work / "nccl1.h5"
    base = ["--checkpoint", str(work / "ck.pt"), "--data", f"imagefolder:{work / 'imgs'}", "--split", "test",
            "--samples", "64", "--res", "9", "--no-render", "--precision", "fp32"]
    code, _, err = finish(subprocess.Popen([sys.executable, "-m", "fastland.surface", *base, "--out", str(ref)], env=env,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    assert code == 0, err
    code, _, err = finish(torchrun(env, 2, [*base, "--out", str(out), "--dist-backend", "nccl"]))
    assert code == 0, err
    np.testing.assert_allclose(arrays(out)["test_loss"], arrays(ref)["test_loss"], rtol=1e-5)
    assert "nccl" in str(attrs(out)["last_run_backend"])
