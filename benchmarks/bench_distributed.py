"""Distributed surfaces (torchrun, gloo) on the 2-core CPU: the cost of the distributed path.

Target (issue 13): 2 ranks x 1 thread within 15% of 1 rank x 2 threads on the same LeNet surface,
and a writer that is not the bottleneck below 32 ranks.

Run: ``python benchmarks/bench_distributed.py [--rounds 3]`` writes
``benchmarks/results/distributed-cpu-DATE.{json,md}`` (the md holds the scaling model for 8 GPUs x
4 nodes); ``pytest benchmarks/bench_distributed.py --benchmark-only`` runs one round at a smaller
grid as one case, with the numbers in its ``extra_info``.

Measured:

- **ranks vs threads**: ``python -m fastland.surface`` on LeNet (256 synthetic test images, 31x31)
  as 1 rank x 2 threads (``OMP_NUM_THREADS=2``), 2 ranks x 1 thread (``torchrun --standalone
  --nproc-per-node 2``) and 1 rank x 1 thread (the per-core baseline), each a fresh launch,
  interleaved round-robin; the time is the evaluation as the file records it (``last_run_seconds``:
  from the first chunk handed out to the last one written, so the queue, the writer and a late
  rank's start are in it; imports and data generation are not), best of the rounds (median beside).
- **the writer alone**: rank 0's ``ResultWriter`` popping pre-packed chunks off a real TCP store
  queue into a real 201x201 HDF5 surface file (loss, accuracy, done), for several chunk sizes:
  chunks/s and points/s it sustains, against what 32 ranks would hand it.
- **per chunk**: the bytes a chunk costs on the wire (its result, its claim) and the round trips
  of a claim (``store.add``) and a push (``queue_push``) on loopback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = {  # name: (ranks, threads per rank, extra environment)
    "1 rank x 2 threads": (1, 2, {}),
    "2 ranks x 1 thread": (2, 1, {}),
    "1 rank x 1 thread": (1, 1, {}),
    # OpenMP's threads wait for each other by spinning first: on a shared, oversubscribed machine a
    # descheduled thread stalls the other; passive waiting shows how much of the 2-thread time is that.
    "1 rank x 2 threads, OMP_WAIT_POLICY=PASSIVE": (1, 2, {"OMP_WAIT_POLICY": "PASSIVE"}),
}
WRITER_CHUNKS = (32, 256, 2048)  # points per chunk
TARGET = 0.15


# --- ranks against threads ----------------------------------------------------------------------
def make_checkpoint(folder: Path) -> Path:
    from fastland import models

    return models.save_checkpoint(folder / "lenet.pt", "lenet", models.randomized("lenet", 0))


def launch(name: str, ckpt: Path, out: Path, res: int, samples: int) -> dict[str, object]:
    """One run of ``python -m fastland.surface`` as ``name``; its evaluation time from the file."""
    ranks, threads, extra = CANDIDATES[name]
    argv = ["-m", "fastland.surface", "--checkpoint", str(ckpt), "--data", "synthetic", "--split", "test", "--samples",
            str(samples), "--res", str(res), "--device", "cpu", "--no-render", "--out", str(out), "--overwrite"]
    if ranks > 1:
        argv = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), *argv]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"OMP_NUM_THREADS": str(threads), "FASTLAND_OFFLINE": "1", **extra}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed: {proc.stderr[-2000:]}")
    from fastland import surfacefile

    a = surfacefile.read(out).attrs
    rows = a.get("last_run_ranks", [])
    return {"candidate": name, "ranks": ranks, "threads": threads, "seconds": float(a["last_run_seconds"]),
            "points": int(a["last_run_points"]), "wall_seconds": wall, "device": a["device"],
            "per_rank": json.loads(rows) if isinstance(rows, str) else rows}


def compare(rounds: int, res: int, samples: int, folder: Path) -> dict[str, list[dict[str, object]]]:
    ckpt = make_checkpoint(folder)
    results: dict[str, list[dict[str, object]]] = {n: [] for n in CANDIDATES}
    for r in range(rounds):
        order = list(CANDIDATES) if r % 2 == 0 else list(reversed(CANDIDATES))  # alternate who goes first
        for name in order:
            results[name].append(launch(name, ckpt, folder / f"c{list(CANDIDATES).index(name)}.h5", res, samples))
            print(f"round {r + 1}: {name}: {results[name][-1]['seconds']:.2f} s", file=sys.stderr, flush=True)
    return results


# --- the writer alone ---------------------------------------------------------------------------
def writer_throughput(chunk: int, folder: Path, grid: int = 201, chunks: int = 60) -> dict[str, float]:
    """Points/s rank 0's writer sustains: pops from a real TCP store queue, writes a real HDF5 file."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from fastland import distributed, surfacefile

    path = folder / f"writer-{chunk}.h5"
    x = y = np.linspace(-1, 1, grid)
    attrs = {"split": "train", "model": "bench"}
    surfacefile.create(path, x, y, [], attrs, accuracy=True)
    sink = surfacefile.Writer(path)
    store = dist.TCPStore("127.0.0.1", 0, 1, True, dt.timedelta(seconds=60), wait_for_workers=False)
    count = min(chunks, grid * grid // chunk)
    order = np.random.default_rng(0).permutation(count)  # chunks arrive out of order, as from many ranks
    pieces = [np.arange(k * chunk, (k + 1) * chunk) for k in range(count)]
    loss, acc = torch.rand(chunk, dtype=torch.float64), torch.rand(chunk, dtype=torch.float64)
    t0 = time.perf_counter()
    for k in order:
        store.queue_push("results", distributed.pack_result(int(k), int(k) % 32, loss, acc, 1.0))
    push = (time.perf_counter() - t0) / count
    writer = distributed.ResultWriter(store, pieces, sink, {})
    t0 = time.perf_counter()
    writer.start()
    writer.join()
    seconds = time.perf_counter() - t0
    sink.close()
    if writer.error is not None:
        raise writer.error
    assert len(writer.written) == count and int(surfacefile.read(path).done.sum()) == count * chunk
    return {"chunk": chunk, "chunks": count, "seconds": seconds, "chunks_per_s": count / seconds,
            "points_per_s": count * chunk / seconds, "push_seconds": push}


def store_roundtrips(n: int = 2000) -> dict[str, float]:
    """A claim (``store.add``) and a check (``store.check``) on loopback, from a client as a worker holds."""
    import torch.distributed as dist

    server = dist.TCPStore("127.0.0.1", 0, 1, True, dt.timedelta(seconds=60), wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", server.port, None, False, dt.timedelta(seconds=60))
    out = {}
    for name, op in (("claim_seconds", lambda: client.add("next", 1)), ("check_seconds", lambda: client.check(["x"]))):
        t0 = time.perf_counter()
        for _ in range(n):
            op()
        out[name] = (time.perf_counter() - t0) / n
    return out


def bytes_per_chunk(points: int, accuracy: bool = True) -> dict[str, int]:
    """What one chunk costs on the wire: its result (header + fp64 values) and its claim, with the
    TCP store's framing (a command byte, then each key and value with an 8-byte length)."""
    import torch

    from fastland import distributed

    payload = len(distributed.pack_result(0, 0, torch.zeros(points, dtype=torch.float64),
                                          torch.zeros(points, dtype=torch.float64) if accuracy else None, 0.0))
    key = len("fastland/<run id 36 chars>/0/call1/results") + 36
    push = 1 + 8 + key + 8 + payload
    pop = (1 + 8 + key + 1) + (8 + payload)  # rank 0's request and the answer
    claim = 2 * (1 + 8 + key + 8 + 8)  # store.add: key + delta, and the new value back
    return {"points": points, "result_payload": payload, "push": push, "pop": pop, "claim": claim,
            "total": push + pop + claim}


# --- report ----------------------------------------------------------------------------------
def machine(command: str) -> dict[str, object]:
    import numpy
    import torch

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "fastland", "benchmarks/bench_distributed.py"],
                                cwd=ROOT, capture_output=True, text=True).stdout.strip())
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"device": f"cpu ({os.cpu_count()} cores)", "cpu": cpu, "python": platform.python_version(),
            "torch": str(torch.__version__), "numpy": numpy.__version__, "commit": commit, "dirty": dirty,
            "date": dt.date.today().isoformat(), "command": command,
            "loadavg_start": [round(v, 2) for v in os.getloadavg()]}


def summarize(results: dict[str, list[dict[str, object]]]) -> dict[str, dict[str, float]]:
    out = {}
    for name, runs in results.items():
        secs = [float(r["seconds"]) for r in runs]
        points = int(runs[0]["points"])
        out[name] = {"best": min(secs), "median": statistics.median(secs), "points": points,
                     "points_per_s": points / min(secs)}
    return out


def run_all(rounds: int, res: int, samples: int, command: str) -> dict[str, object]:
    data: dict[str, object] = {"machine": machine(command), "rounds": rounds, "res": res, "samples": samples}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        results = compare(rounds, res, samples, folder)
        data["results"] = results
        data["summary"] = summarize(results)
        data["writer"] = [writer_throughput(c, folder) for c in WRITER_CHUNKS]
    data["store"] = store_roundtrips()
    data["bytes"] = [bytes_per_chunk(p) for p in (*WRITER_CHUNKS, 4096)]
    data["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]  # type: ignore[index]
    s = data["summary"]
    data["ratio"] = s["2 ranks x 1 thread"]["best"] / s["1 rank x 2 threads"]["best"]  # type: ignore[index]
    data["ratio_passive"] = (s["2 ranks x 1 thread"]["best"]  # type: ignore[index]
                             / s["1 rank x 2 threads, OMP_WAIT_POLICY=PASSIVE"]["best"])  # type: ignore[index]
    # The target bounds the distributed path's cost: 2 ranks at most 15% slower than 2 threads. (Faster by
    # more than that happens when the machine's load stalls the threads; the report says so.)
    data["target_met"] = data["ratio"] <= 1 + TARGET  # type: ignore[operator]
    return data


def markdown(data: dict[str, object]) -> str:
    m, s = data["machine"], data["summary"]
    n = int(data["res"]) ** 2
    lines = [f"# Distributed surfaces (torchrun, gloo): {m['device']}, {m['date']}", "",
             f"- CPU {m['cpu']}; torch {m['torch']}, numpy {m['numpy']}, Python {m['python']}",
             f"- commit {m['commit'][:12]}{' (with uncommitted changes)' if m['dirty'] else ''}; load average at start "
             f"{m['loadavg_start']}, at end {m['loadavg_end']} (the machine is shared)",
             f"- command: `{m['command']}`",
             f"- surface: LeNet (randomized), {data['samples']} synthetic test images, {data['res']}x{data['res']} = "
             f"{n:,} points, fp32, loop strategy, automatic chunks; {data['rounds']} rounds, candidates interleaved, each "
             "a fresh launch; time = the evaluation as the file records it (`last_run_seconds`)", "",
             "| candidate | seconds, best (median) | points/s | vs 1 rank x 2 threads |", "|---|---|---|---|"]
    base = s["1 rank x 2 threads"]["best"]
    for name, v in s.items():
        lines.append(f"| {name} | {v['best']:.2f} ({v['median']:.2f}) | {v['points_per_s']:,.0f} | "
                     f"{v['best'] / base:.2f}x time |")
    rounds = {name: ", ".join(f"{float(r['seconds']):.2f}" for r in runs) for name, runs in data["results"].items()}
    lines += ["", "Every round, in seconds: " + "; ".join(f"{name}: {secs}" for name, secs in rounds.items())
        + ". Two threads of one process stall whenever the shared machine deschedules one of them (OpenMP "
          "spins, then waits for the other), so under load their time swings by 10x; single-thread ranks do not."]
    ratio = float(data["ratio"])
    one = s["1 rank x 1 thread"]["best"]
    faster = " (2 ranks faster: the threads lost more to the load)" if ratio < 1 - TARGET else ""
    lines += ["", f"Target (2 ranks x 1 thread within 15% of 1 rank x 2 threads, i.e. the distributed path costs "
                  f"at most 15%): {'met' if ratio <= 1 + TARGET else 'not met'}: {ratio:.2f}x the time{faster}; "
                  f"{float(data['ratio_passive']):.2f}x that of 2 threads waiting passively. "
                  f"Speed-up over one core: 2 ranks {one / s['2 ranks x 1 thread']['best']:.2f}x, "
                  f"2 threads {one / base:.2f}x.", ""]
    best2 = min(data["results"]["2 ranks x 1 thread"], key=lambda r: r["seconds"])
    rows = best2.get("per_rank") or []
    if rows:
        busy = sum(r["busy_seconds"] for r in rows) / (len(rows) * float(best2["seconds"]))
        lines += ["Per rank in the best 2-rank run: " + ", ".join(
            f"rank {r['rank']} {r['points']} points in {r['busy_seconds']:.2f} s busy" for r in rows)
            + f" of {float(best2['seconds']):.2f} s: the ranks computed {busy:.0%} of the time (the rest: a rank's "
              "later start, the last chunk's tail, the queue and the writer).", ""]
    lines += ["## The writer alone (rank 0's writer thread: store queue -> 201x201 HDF5 file)", "",
              "| points per chunk | chunks/s | points/s | push per chunk (worker side) |", "|---|---|---|---|"]
    for w in data["writer"]:
        lines.append(f"| {w['chunk']:,} | {w['chunks_per_s']:,.0f} | {w['points_per_s']:,.0f} | "
                     f"{w['push_seconds'] * 1e3:.2f} ms |")
    st = data["store"]
    lines += ["", f"Store round trips on loopback: a claim (`store.add`) {st['claim_seconds'] * 1e6:.0f} µs, a check "
                  f"{st['check_seconds'] * 1e6:.0f} µs.", "",
              "## Bytes per chunk (loss and accuracy; fp64 values)", "",
              "| points | result payload | push | pop (rank 0) | claim | total on the wire |", "|---|---|---|---|---|---|"]
    for b in data["bytes"]:
        lines.append(f"| {b['points']:,} | {b['result_payload']:,} B | {b['push']:,} B | {b['pop']:,} B | "
                     f"{b['claim']} B | {b['total']:,} B ({b['total'] / b['points']:.1f} B/point) |")
    lines += ["", scaling_model(data), ""]
    return "\n".join(lines)


def scaling_model(data: dict[str, object]) -> str:
    """The paper model for 8 GPUs x 4 nodes, from the measured writer and the bytes above (``markdown``
    regenerates a report from a saved JSON: ``markdown(json.load(open(PATH)))``)."""
    writer = {w["chunk"]: w for w in data["writer"]}
    big = writer[max(writer)]
    return "\n".join([
        "## Scaling model: 8 GPUs x 4 nodes (32 ranks)",
        "",
        "Per chunk of P points, a rank sends its result (32 B + 16 B a point, fp64 loss and accuracy) to the TCP "
        "store on the rendezvous host and rank 0 pops it (the same bytes again), plus a claim of ~170 B; "
        "about 33 B a point on the wire in all (table above). Besides: the plan (run-length coded pending points) "
        "and, at the end, the surface for every rank (17 B a point from the store to each, once); heartbeats (~40 B per rank "
        "per second, and a read of all 32 counters).",
        "",
        "- **Demand.** The engine sizes chunks for ~2 s of work (`CHUNK_SECONDS`), cut to at least 4 chunks a "
        "rank. The GPU target is LeNet-BN 201x201 on 10,000 images in 20 s on one H100, i.e. ~2,000 points/s "
        "per GPU: 32 GPUs make ~65,000 points/s, in ~16 chunks/s of ~4,000 points (at 201x201 the cut to 4 "
        "chunks a rank gives 316-point chunks, ~200 chunks/s). VGG-16 51x51 is ~40 points/s per GPU: ~1,300 "
        "points/s for 32.",
        f"- **Writer.** Measured here alone: {big['points_per_s']:,.0f} points/s at {big['chunk']:,}-point chunks, "
        f"{writer[256]['points_per_s']:,.0f} at 256 and {writer[32]['points_per_s']:,.0f} at 32 "
        f"({writer[32]['chunks_per_s']:,.0f} chunks/s). So a writer that keeps up with 32 LeNet GPUs needs chunks "
        f"of at least ~{max(1, int(65_000 / max(1.0, writer[32]['chunks_per_s'])))} points (65,000 points/s / "
        f"{writer[32]['chunks_per_s']:,.0f} chunks/s); the automatic chunks (hundreds to thousands of points) are "
        "there, and VGG-size models are 50x further away. The writer becomes the bottleneck only for tiny models "
        "on many GPUs with tiny chunks: then raise `--chunk`. Rank 0 also computes; its writer thread costs it "
        "about 1 ms a chunk.",
        "- **Network.** 65,000 points/s x ~33 B = ~2 MB/s through the store host: nothing for a 10-100 Gb/s "
        "fabric (0.02% of 100 Gb/s). The store itself (one TCP server; a claim takes "
        f"{data['store']['claim_seconds'] * 1e6:.0f} µs on loopback, i.e. tens of thousands of requests/s) sees ~3 "
        "requests a chunk: 50-600 requests/s at 32 ranks, plus 32 heartbeats and 32 reads of the counters a "
        "second. The network or the store would bind only beyond ~1,000 ranks with small chunks. Sharded data "
        "(`--shard`) adds an all-reduce of 16 B a point per chunk over NCCL: ~1 MB/s at 65,000 points/s.",
        "- **What binds instead.** Per-rank start-up (model, data on the device, the strategy probe; rank 0 plans "
        "first, so the others start a probe later) and the tail: with 4 chunks a rank the last chunk leaves at most "
        "~1/4 of a rank's share idle on the others; a 201x201 LeNet grid on 32 H100s is ~0.6 s of work per rank, so "
        "start-up dominates there (a GPU run is owed to measure it); big models and grids amortize it.",
        "",
        "## Owed on a GPU",
        "",
        "1 GPU against N processes on one GPU is not meaningful, and `torchrun --nproc-per-node 1` runs the plain "
        "one-process path. A GPU run should record (a) the single-GPU throughput, points/s of `python -m "
        "fastland.surface` for LeNet-BN 201x201 and VGG-16-BN 51x51 on 10,000 images, which sets the demand above; "
        "(b) the per-chunk overhead of a GPU rank: a claim and a push (store round trips, measured here in tens of "
        "µs) next to the chunk's compute time, and on a machine with 2+ GPUs the gap between each rank's busy "
        "seconds (`last_run_ranks`) and the run's wall time for 1, 2 and 8 ranks, with `--dist-backend nccl` "
        "(`tests/test_distributed.py::test_nccl_two_ranks_on_one_gpu_each` checks that path).",
    ])


def test_distributed_overhead(benchmark: pytest.FixtureRequest) -> None:
    """One round at 21x21: the three candidates, the writer, the bytes (numbers in extra_info)."""
    data = benchmark.pedantic(run_all, args=(1, 21, 256, "pytest benchmarks/bench_distributed.py --benchmark-only"),
                              rounds=1, iterations=1)
    benchmark.extra_info.update({"ratio": data["ratio"], "summary": data["summary"], "writer": data["writer"],
                                 "store": data["store"]})
    assert all(w["points_per_s"] > 0 for w in data["writer"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--res", type=int, default=31)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--tag", default="", help="a suffix for the result files, so that a second run of the day does not "
                                            "replace the first")
    a = p.parse_args()
    command = "python benchmarks/bench_distributed.py " + " ".join(sys.argv[1:])
    data = run_all(a.rounds, a.res, a.samples, command)
    stem = a.out / f"distributed-cpu-{data['machine']['date']}{'-' + a.tag if a.tag else ''}"
    stem.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
