"""Scale-out with ``torch.distributed``: many processes, GPUs and machines share one surface.

    torchrun --standalone --nproc-per-node 8 -m fastland.surface --checkpoint ck.pt --res 201
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m fastland.surface ...

The same code runs a script that calls ``fastland.surface(...)`` under torchrun, or processes
started with ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` set (Slurm's ``srun``);
``fastland.api`` hands its grid to ``run_surface`` whenever such a launch (or an initialized
process group) is present.

**One process per device.** Every rank computes on ``cuda:LOCAL_RANK`` (or the CPU), builds the
same evaluator (the directions are seeded, so every rank computes the same ones; a hash of every
setting, the directions, the weights and the data is compared across ranks, and a rank with other
settings stops every rank with one line). The process group (NCCL on GPUs, gloo on CPUs) is made
when a collective first needs it (sharded data, data-parallel Hessian products); the chunk queue and
the results go through the launcher's TCP store alone.

**A shared chunk queue, one writer.** The pending points (from the file's ``done`` mask, whatever
the world size of earlier runs) are cut into chunks; ranks *pull* chunk numbers from a counter in
the launcher's TCP store (``store.add``), so a slow rank takes fewer chunks instead of holding the
run back. Each rank pushes its finished chunk (8 bytes a value) onto a store queue and goes on at
once; rank 0 alone opens the HDF5 file and holds its ``WriteLock``, and a writer thread there pops
the chunks and writes them (values first, then ``done`` flags), so no rank ever waits for the
disk. Rank 0 computes chunks too: writing costs it ~1 ms a chunk (``benchmarks/bench_distributed.py``).
Results go through the store rather than gloo/NCCL point-to-point so that a worker never blocks on
rank 0, and NCCL (which cannot receive from any source) needs no second process group. The file
records the world size of each run (``world_sizes``) and points/s per rank (``last_run_ranks``).

**Bit-identical to one process.** The ``loop`` strategy evaluates each point on its own, so which
rank and which chunk a point falls in changes no bit: with ``OMP_NUM_THREADS=1`` a run on any number
of ranks writes the same file as one process. (Two exceptions in the engine, where a one-point
block takes another path: ``ignore='none'`` with BN, and ``bn_mode='batch'``; there a point's value
may differ in the last bits with the chunking, in one process as in many.)

**Sharded data.** ``shard=True`` (or automatically, when the data set does not fit a device but
its shards do) gives each rank a contiguous slice of the samples, cut at multiples of
``batch_size``; every rank then evaluates every chunk on its slice and an all-reduce of the
per-point sums, divided by the global N, gives the mean loss (and the exact accuracy).

**Faults** (``timeout``: ``--dist-timeout`` or ``FASTLAND_DIST_TIMEOUT``, default 60 s). Every
rank beats a counter in the store from a thread; a peer whose counter stops for ``timeout``
seconds, a peer that reports an error, or torchrun's SIGTERM after a rank died ends every rank
with one line that names the rank; a rank whose main thread cannot stop within half the timeout
more exits hard. Chunks already written stay written (values before ``done`` flags), and a rerun,
or torchrun's elastic restart (``--max-restarts``), computes only what is left. torch's own C++
log lines are kept in a file (``fastland-torch-PID.log`` in the temp folder) instead of the
terminal, so that a failure prints one line (``FASTLAND_DIST_DEBUG=1`` shows them).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import io
import json
import math
import os
import pickle
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fastland import data as data_mod
from fastland import files, surfacefile
from fastland.device import free_memory
from fastland.errors import UserError, one_line, say

BACKENDS = ("auto", "nccl", "gloo")
DEFAULT_TIMEOUT = 60.0  # seconds: a lost peer is noticed within this
CHUNKS_PER_RANK = 4  # chunks per rank at least, when the chunk size is automatic: the queue needs some to balance
_EXIT_HARD = 2  # the exit code of a rank that had to stop without unwinding (a lost peer, like any user-fixable stop)


class PeerLost(UserError):
    """Another rank died, failed or stopped answering; finished chunks are saved."""


# --- the launch ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Launch:
    """What the launcher (torchrun, srun, a script) told this process through the environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    agent_store: bool  # torchrun: its agent hosts the TCP store; otherwise rank 0 hosts it
    namespace: str  # store keys of this attempt (torchrun's restarts share the agent's store)


def launched() -> Launch | None:
    """The launch this process belongs to, from ``RANK``/``WORLD_SIZE``/...; None when not launched so
    (or when ``FASTLAND_DIST=off``: fastland then runs in this process alone, e.g. on rank 0 only)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or _off():
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count())))
        port = int(os.environ.get("MASTER_PORT", "0"))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT must be integers; start the ranks with torchrun "
                        "or set them as numbers") from None
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK {rank} does not fit WORLD_SIZE {world}; ranks run from 0 to WORLD_SIZE-1")
    addr = os.environ.get("MASTER_ADDR", "")
    if world > 1 and (not addr or not 0 < port < 65536):
        raise UserError("RANK and WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not (or the port is not 1-65535); "
                        "start the ranks with torchrun, or set both on every rank")
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "env")
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return Launch(rank, world, local, addr, port, agent, f"fastland/{run_id}/{attempt}")


def _off() -> bool:
    return os.environ.get("FASTLAND_DIST", "").lower() in ("off", "0", "no", "false")


def device_name(device: str | torch.device | None) -> str:
    """The device a rank computes on: under a launch, ``auto``/``cuda`` mean ``cuda:LOCAL_RANK``."""
    name = "auto" if device is None else str(device)
    launch = launched()
    if launch is None or launch.world_size == 1 or name not in ("auto", "cuda"):
        return name
    if name == "auto" and not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{launch.local_rank}" if torch.cuda.is_available() else name


def _timeout(value: float | None) -> float:
    raw = value if value is not None else os.environ.get("FASTLAND_DIST_TIMEOUT", DEFAULT_TIMEOUT)
    try:
        t = float(raw)
    except (TypeError, ValueError):
        raise UserError(f"the distributed timeout must be a number of seconds, got {raw!r} "
                        "(--dist-timeout or FASTLAND_DIST_TIMEOUT)") from None
    if not math.isfinite(t) or t < 1:
        raise UserError(f"the distributed timeout must be at least 1 second, got {raw!r}")
    return t


# --- torch's C++ log lines ---------------------------------------------------------------------
class _CppLog:
    """Sends file descriptor 2 (where torch's C++ code logs, with stack traces) to a file, and
    Python's ``sys.stderr`` (progress bars, warnings, fastland's one-line errors) to the terminal."""

    def __init__(self) -> None:
        self.path = Path(tempfile.gettempdir()) / f"fastland-torch-{os.getpid()}.log"
        sys.stderr.flush()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._saved = os.dup(2)
        os.dup2(fd, 2)
        os.close(fd)
        self._old = sys.stderr
        sys.stderr = io.TextIOWrapper(io.FileIO(self._saved, "w", closefd=False), line_buffering=True,
                                      errors="backslashreplace", encoding=getattr(self._old, "encoding", None))

    def note(self) -> str:
        """`` (torch's messages: PATH)`` when torch logged anything, for an error line."""
        try:
            return f" (torch's messages: {self.path})" if self.path.stat().st_size else ""
        except OSError:
            return ""

    def close(self) -> None:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(self._saved, 2)
        sys.stderr = self._old
        with contextlib.suppress(OSError):
            if not self.path.stat().st_size:
                self.path.unlink()


def _say_and_exit(message: str) -> None:
    """Print one line and end this process now (a thread that cannot unwind the main one)."""
    with contextlib.suppress(Exception):
        say(f"error: {one_line(message)}")
    os._exit(_EXIT_HARD)


@contextlib.contextmanager
def _deadline(seconds: float, message: str) -> Iterator[None]:
    """End the process with ``message`` if the block does not finish in time: a TCP store client
    can wait forever on a port that another program holds."""
    timer = threading.Timer(seconds, _say_and_exit, args=(message,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


# --- the context: store, heartbeat, process group ------------------------------------------------
def _backoff(step: int) -> float:
    return min(0.05, 0.001 * (2 ** min(step, 6)))


class Context:
    """This rank in a distributed job: the store, the peers' liveness, the process group."""

    def __init__(self, launch: Launch, backend: str, timeout: float, store: Any, server: Any,
                 log: _CppLog | None, owns_group: bool) -> None:
        self.launch, self.rank, self.world_size = launch, launch.rank, launch.world_size
        self.local_rank, self.backend, self.timeout = launch.local_rank, backend, timeout
        self.device = torch.device(f"cuda:{launch.local_rank}" if backend == "nccl" else "cpu")  # collectives' tensors
        self._base, self._server, self._log, self._owns_group = store, server, log, owns_group
        self.store = dist.PrefixStore(launch.namespace, store)
        self.peers: list[dict[str, Any]] = []
        self._failure: str | None = None
        self._failure_at = 0.0
        self._active = 0
        self._calls = 0
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._old_sigterm: Any = None
        self.period = min(1.0, max(0.05, timeout / 20))

    # -- setup -------------------------------------------------------------------------------
    def client(self) -> Any:
        """A store connection of its own, for a thread (a TCP store client is one socket)."""
        return dist.PrefixStore(self.launch.namespace, self._base.clone())

    def join(self, error: str | None) -> None:
        """Meet every peer: exchange who they are and whether they could start; one line on every
        rank when any could not, or when they disagree on the backend or the timeout."""
        me = {"host": socket.gethostname(), "pid": os.getpid(), "backend": self.backend, "timeout": self.timeout,
              "torch": str(torch.__version__), "error": error or ""}
        self.store.add(f"beat/{self.rank}", 1)
        self.peers = [json.loads(v) for v in self.gather("join", json.dumps(me), joining=True)]
        failed = [p["error"] for p in self.peers if p["error"]]
        if failed:  # the same line on every rank (each error names its rank)
            raise UserError(failed[0])
        for key, what in (("backend", "--dist-backend"), ("timeout", "--dist-timeout"), ("torch", "the torch version")):
            values = {p[key] for p in self.peers}
            if len(values) > 1:
                shown = ", ".join(f"rank {r}: {p[key]}" for r, p in enumerate(self.peers))
                raise UserError(f"the ranks disagree on {what} ({shown}); start every rank with the same command")
        self._watcher = threading.Thread(target=self._watch, name="fastland-heartbeat", daemon=True)
        self._watcher.start()
        if threading.current_thread() is threading.main_thread():
            self._old_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)

    def gather(self, name: str, value: str, store: Any = None, joining: bool = False) -> list[str]:
        """Every rank's ``value`` for ``name``, in rank order (through the store)."""
        store = store or self.store
        keys = [f"{name}/{r}" for r in range(self.world_size)]
        with self.talking():
            store.set(f"{name}/{self.rank}", value)
            self.wait(keys, store, owners=list(range(self.world_size)), joining=joining)
            return [v.decode() for v in store.multi_get(keys)]

    def wait(self, keys: list[str], store: Any, owners: list[int], joining: bool = False) -> None:
        """Wait for ``keys`` (``keys[i]`` set by rank ``owners[i]``) while the peers live: a peer lost,
        a peer that left without setting its key, or (``joining``) one that has not connected after
        ``timeout`` seconds ends the wait with ``PeerLost``."""
        with self.talking():
            self._wait(keys, store, owners, joining)

    def _wait(self, keys: list[str], store: Any, owners: list[int], joining: bool) -> None:
        start, step, looked = time.monotonic(), 0, time.monotonic()
        while not store.check(keys):
            self.check()
            now = time.monotonic()
            if joining and now - start > self.timeout:
                missing = [r for r in range(self.world_size) if not self.store.check([f"beat/{r}"])]
                if missing:
                    raise PeerLost(f"rank {missing[0]} did not join within {self.timeout:.0f} s (it did not start, "
                                   "started with another MASTER_ADDR/MASTER_PORT, or does not run fastland; set "
                                   "FASTLAND_DIST=off to run fastland on one rank alone)")
            if not joining and now - looked > 0.5:
                looked = now
                waiting = sorted({o for k, o in zip(keys, owners, strict=True) if not store.check([k])})
                beats = self.store.multi_get([f"beat/{r}" for r in waiting]) if waiting else []
                left = [r for r, b in zip(waiting, beats, strict=True) if int(b) < 0]
                if left and self.store.check(["abort"]):  # it said why
                    raise PeerLost(self.store.get("abort").decode())
                if left:
                    raise PeerLost(f"rank {left[0]} ended before this step (it failed: see its own error line)")
            time.sleep(_backoff(step))
            step += 1

    # -- liveness ----------------------------------------------------------------------------
    def check(self) -> None:
        """Raise ``PeerLost`` when a peer was lost or reported a failure."""
        if self._failure is not None:
            raise PeerLost(self._failure + self._note())

    @contextlib.contextmanager
    def talking(self) -> Iterator[None]:
        """Store operations of the main thread: a store that went away is a lost peer, in one line."""
        try:
            yield
        except dist.QueueEmptyError:
            raise
        except dist.DistError as err:
            self.check()
            raise PeerLost(self._store_lost(err) + self._note()) from None

    def _store_lost(self, err: BaseException) -> str:
        host = "the torchrun agent, which hosts it," if self.launch.agent_store else "rank 0, which hosts it,"
        return (f"lost contact with the rendezvous store at {self.launch.master_addr}:{self.launch.master_port} "
                f"({type(err).__name__}): {host} ended")

    def _note(self) -> str:
        return self._log.note() if self._log is not None else ""

    def _fail(self, message: str, publish: bool = True, store: Any = None) -> None:
        if self._failure is None:
            self._failure, self._failure_at = message, time.monotonic()
            if publish and store is not None:
                with contextlib.suppress(Exception):
                    store.compare_set("abort", "", message)

    def fail(self, message: str) -> None:
        """Tell every rank that this one failed (they stop with ``message``)."""
        with contextlib.suppress(Exception):
            self.store.compare_set("abort", "", message)

    def _watch(self) -> None:
        """The heartbeat thread: beat, read the peers' beats and the abort flag; a stale peer or an
        abort ends the job; a main thread that cannot stop in time is ended hard."""
        try:
            store = self.client()
        except Exception as err:  # noqa: BLE001 - the store went away before the thread started
            self._fail(f"lost contact with the rendezvous store ({type(err).__name__})", publish=False)
            return
        keys = [f"beat/{r}" for r in range(self.world_size)]
        seen: dict[int, tuple[int, float]] = {}
        grace = max(2.0, self.timeout / 2)
        while not self._stop.wait(self.period):
            now = time.monotonic()
            try:
                store.add(f"beat/{self.rank}", 1)
                if store.check(["abort"]):
                    self._fail(store.get("abort").decode(), publish=False)
                for r, raw in enumerate(store.multi_get(keys)):
                    v = int(raw)
                    if r == self.rank or v < 0:  # this rank, or a rank that ended cleanly
                        continue
                    if seen.get(r, (None, 0.0))[0] != v:
                        seen[r] = (v, now)
                    elif now - seen[r][1] > self.timeout:
                        p = self.peers[r] if r < len(self.peers) else {}
                        self._fail(f"rank {r} (pid {p.get('pid', '?')} on {p.get('host', '?')}) stopped responding for "
                                   f"{self.timeout:.0f} s: it died or hangs", store=store)
            except Exception as err:  # noqa: BLE001 - any store failure means the store (its host) is gone
                if self._stop.is_set():
                    return
                self._fail(self._store_lost(err), publish=False)
            if self._failure is not None and self._active and now - self._failure_at > grace:
                _say_and_exit(f"{self._failure}; rank {self.rank} could not stop within {grace:.0f} s and exits now"
                              + self._note())

    def _on_sigterm(self, signum: int, frame: object) -> None:
        """torchrun stops the other ranks with SIGTERM when one dies: say which one, then unwind
        (rank 0 closes the file); outside fastland's work, the default action."""
        if not self._active:
            signal.signal(signal.SIGTERM, self._old_sigterm or signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise PeerLost(self._explain_sigterm() + self._note())

    def _explain_sigterm(self) -> str:
        if self._failure is not None:
            return self._failure
        with contextlib.suppress(Exception):
            if self.store.check(["abort"]):
                return self.store.get("abort").decode()
        host = socket.gethostname()
        dead = [r for r, p in enumerate(self.peers) if r != self.rank and p["host"] == host and not _alive(p["pid"])]
        if dead:
            return ", ".join(f"rank {r} (pid {self.peers[r]['pid']})" for r in dead) + \
                f" died; the launcher stopped rank {self.rank}"
        return (f"the launcher stopped rank {self.rank} (SIGTERM): a rank on another node failed, or the job was "
                "cancelled")

    # -- calls -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """One fastland call on every rank (its own store keys); a failure here stops every rank."""
        self.check()
        self._calls += 1
        sess = Session(self, f"call{self._calls}")
        self._active += 1
        try:
            yield sess
        except PeerLost:
            raise
        except BaseException as exc:
            why = one_line(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {one_line(exc)[:200]}"
            self.fail(f"rank {self.rank} failed: {why}")
            raise
        finally:
            self._active -= 1

    def group(self) -> None:
        """The default process group (NCCL on GPUs, gloo on CPUs), made on the first collective: the
        chunk queue needs only the store, so a plain surface run never opens NCCL/gloo connections."""
        if dist.is_initialized():
            return
        kwargs = {"device_id": self.device} if self.backend == "nccl" else {}
        try:
            dist.init_process_group(self.backend, store=dist.PrefixStore(f"{self.launch.namespace}/pg", self._base),
                                    rank=self.rank, world_size=self.world_size,
                                    timeout=dt.timedelta(seconds=self.timeout), **kwargs)
        except (dist.DistError, RuntimeError) as err:
            self.check()
            raise UserError(f"rank {self.rank}: the {self.backend} process group could not start "
                            f"({one_line(err)[:200]})" + self._note()) from None
        self._owns_group = True

    def collective(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a collective; a peer lost during it becomes ``PeerLost`` (not torch's error text)."""
        self.check()
        self.group()
        try:
            return fn(*args, **kwargs)
        except (dist.DistError, RuntimeError) as err:
            time.sleep(min(2.0, self.timeout))  # the heartbeat or the abort flag usually says who
            if self._failure is None:
                with contextlib.suppress(Exception):
                    if self.store.check(["abort"]):
                        self._fail(self.store.get("abort").decode(), publish=False)
            self.check()
            raise PeerLost(f"a collective failed on rank {self.rank} ({type(err).__name__}: {one_line(err)[:160]}); a "
                           "peer died or its network failed" + self._note()) from None

    def shutdown(self) -> None:
        """Leave cleanly: tell the peers (so this is not taken for a death), wait for them if this
        rank hosts the store, drop the process group, restore stderr and SIGTERM."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=2 * self.period + 1)
        with contextlib.suppress(Exception):
            self.store.set(f"beat/{self.rank}", "-1")
        # The store's host waits for the peers, which still need it; with a process group every rank
        # waits, so that none closes its connections under a peer still using them.
        if (self._server is not None or self._owns_group) and self._failure is None:
            deadline = time.monotonic() + self.timeout
            with contextlib.suppress(Exception):
                keys = [f"beat/{r}" for r in range(self.world_size)]
                while time.monotonic() < deadline and any(int(v) >= 0 for v in self.store.multi_get(keys)):
                    time.sleep(0.05)
        if self._owns_group and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        if self._old_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._old_sigterm)
        if self._log is not None:
            self._log.close()


class Session:
    """Store keys and helpers of one fastland call on every rank."""

    def __init__(self, ctx: Context, prefix: str) -> None:
        self.ctx, self.prefix = ctx, prefix
        self.store = dist.PrefixStore(prefix, ctx.store)

    def client(self) -> Any:
        """This call's keys through a connection of its own (for a thread)."""
        return dist.PrefixStore(self.prefix, self.ctx.client())

    def agree(self, settings: dict[str, Any]) -> None:
        """Every rank must run with the same settings: one line on every rank naming the first that differs."""
        text = json.dumps(settings, sort_keys=True, default=str)
        every = [json.loads(v) for v in self.ctx.gather("settings", text, self.store)]
        for r, other in enumerate(every):
            diff = sorted((k for k in set(other) | set(every[0]) if other.get(k) != every[0].get(k)),
                          key=lambda k: (k.endswith("sha256"), k))  # what the user typed first, the hashes last
            if diff:
                shown = "; ".join(f"{k}: {_short(every[0].get(k))} on rank 0, {_short(other.get(k))} on rank {r}"
                                  for k in diff[:2])
                more = f" and {len(diff) - 2} more" if len(diff) > 2 else ""
                raise UserError(f"rank {r} runs with other settings than rank 0 ({shown}{more}); start every rank with "
                                "the same command, checkpoint and data")

    def publish(self, name: str, value: bytes | str) -> None:
        with self.ctx.talking():
            self.store.set(name, value)

    def fetch(self, name: str) -> bytes:
        """``name`` as rank 0 publishes it (waiting for it)."""
        self.ctx.wait([name], self.store, owners=[0])
        with self.ctx.talking():
            return self.store.get(name)

    def claim(self) -> int:
        """The next chunk number from the shared queue."""
        with self.ctx.talking():
            return int(self.store.add("next", 1)) - 1

    def push(self, payload: bytes) -> None:
        """A finished chunk onto the results queue (rank 0's writer pops it)."""
        with self.ctx.talking():
            self.store.queue_push("results", payload)


_CTX: Context | None = None


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 24 else text[:16] + "…'"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _connect(launch: Launch, timeout: float) -> tuple[Any, Any]:
    """The store client (and the server, when this rank hosts it), with one line for a taken port."""
    where = f"{launch.master_addr}:{launch.master_port}"
    host = launch.rank == 0 and not launch.agent_store
    wait = dt.timedelta(seconds=timeout)
    unreachable = (f"rank {launch.rank} could not reach the rendezvous store at {where} within {timeout:.0f} s: the "
                   "port may be taken by another program, or rank 0 / the launcher has not started; use a free "
                   "MASTER_PORT on every rank")
    with _deadline(timeout + 2, unreachable):
        try:
            if host:
                server = dist.TCPStore(launch.master_addr, launch.master_port, launch.world_size, True, wait,
                                       wait_for_workers=False)
                return server, server
            return dist.TCPStore(launch.master_addr, launch.master_port, None, False, wait), None
        except (dist.DistError, RuntimeError) as err:
            if host and ("EADDRINUSE" in str(err) or "in use" in str(err)):
                raise UserError(f"MASTER_PORT {launch.master_port} is already in use on this machine (rank 0 hosts the "
                                "rendezvous store there); choose a free port and set MASTER_PORT to it on every rank "
                                "(torchrun --standalone picks one)") from None
            raise UserError(unreachable) from None


def _check_backend(backend: str, launch: Launch) -> tuple[str, str | None]:
    """The backend to use and this rank's reason why it cannot (None when it can)."""
    if backend not in BACKENDS:
        return backend, f"unknown --dist-backend {backend!r}; use {', '.join(BACKENDS)}"
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        if not cuda or not dist.is_nccl_available():
            return backend, (f"rank {launch.rank}: --dist-backend nccl needs a CUDA GPU on every rank, but rank "
                             f"{launch.rank} has none; use --dist-backend gloo (or auto) on CPUs")
        if launch.local_rank >= torch.cuda.device_count():
            return backend, (f"rank {launch.rank}: LOCAL_RANK {launch.local_rank} but this machine has "
                             f"{torch.cuda.device_count()} GPU(s); start at most that many processes per node")
    elif not dist.is_gloo_available():
        return backend, f"rank {launch.rank}: this torch build has no gloo backend; use --dist-backend nccl on GPUs"
    return backend, None


def init(backend: str = "auto", timeout: float | None = None) -> Context | None:
    """Join the distributed job this process was launched into (None when it was not, or alone).

    Connects to the launcher's store (rank 0 hosts it without torchrun), meets every peer and starts
    the heartbeat; each rank computes on ``cuda:LOCAL_RANK`` (or the CPU). The default process group
    (``backend``: NCCL on GPUs, gloo on CPUs) is made by the first collective (``Context.group``),
    unless the caller made one already. Idempotent.
    """
    global _CTX
    if _CTX is not None:
        return _CTX
    t = _timeout(timeout)
    if not dist.is_available():
        if launched() is not None and launched().world_size > 1:  # type: ignore[union-attr]
            raise UserError("this torch build has no torch.distributed; install a torch with it to run on many ranks")
        return None
    if dist.is_initialized():
        return None if _off() or dist.get_world_size() == 1 else _adopt(t)
    launch = launched()
    if launch is None or launch.world_size == 1:
        return None
    log = None if os.environ.get("FASTLAND_DIST_DEBUG") else _CppLog()
    ctx = None
    try:
        backend, error = _check_backend(backend, launch)
        store, server = _connect(launch, t)
        ctx = Context(launch, backend, t, store, server, log, owns_group=False)
        ctx.join(error)
        if backend == "nccl":
            torch.cuda.set_device(ctx.device)
    except BaseException:
        if ctx is not None:  # leave as on success: a rank 0 that hosts the store waits until the peers have read it
            ctx.shutdown()
        elif log is not None:
            log.close()
        raise
    _CTX = ctx
    atexit.register(shutdown)
    return ctx


def _adopt(timeout: float) -> Context:
    """A context around a process group the caller initialized (its store, rank and backend)."""
    global _CTX
    store = dist.distributed_c10d._get_default_store()
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count())))
    launch = Launch(rank, world, local, os.environ.get("MASTER_ADDR", "?"), int(os.environ.get("MASTER_PORT", "0") or 0),
                    True, "fastland/adopted")
    backend = str(dist.get_backend())
    ctx = Context(launch, "nccl" if backend == "nccl" else "gloo", timeout, store, None, None, owns_group=False)
    ctx.join(None)
    _CTX = ctx
    atexit.register(shutdown)
    return ctx


def current() -> Context | None:
    """The distributed context, joined on first use under a launch; None for a single process."""
    if _CTX is not None:
        return _CTX
    launch = launched()
    if (launch is not None and launch.world_size > 1) or (not _off() and dist.is_available() and dist.is_initialized()
                                                           and dist.get_world_size() > 1):
        return init()
    return None


def is_writer() -> bool:
    """Whether this process writes files and prints reports (rank 0, or a single process)."""
    ctx = current()
    return ctx is None or ctx.rank == 0


def shutdown() -> None:
    """Leave the job (also registered with ``atexit``)."""
    global _CTX
    if _CTX is not None:
        ctx, _CTX = _CTX, None
        ctx.shutdown()


@contextlib.contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. training a missing checkpoint), then the other ranks."""
    ctx = current()
    if ctx is None:
        yield
        return
    with ctx.session() as sess:
        if ctx.rank != 0:
            sess.fetch("first")
        yield
        if ctx.rank == 0:
            sess.publish("first", "1")


# --- the command line -------------------------------------------------------------------------
SHARD_CHOICES = {"auto": None, "on": True, "off": False}


def add_args(parser: Any) -> None:
    """The options of a CLI that runs under torchrun: --dist-backend, --dist-timeout, --shard."""
    g = parser.add_argument_group("many GPUs and machines (under torchrun or srun; ignored in one process)")
    g.add_argument("--dist-backend", default="auto", choices=BACKENDS,
                   help="torch.distributed backend: auto (default: nccl with GPUs, gloo on CPUs), nccl or gloo")
    g.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                   help=f"a rank that dies or stops answering ends every rank within this (default "
                        f"$FASTLAND_DIST_TIMEOUT or {DEFAULT_TIMEOUT:.0f}); also bounds the start-up and collectives")
    g.add_argument("--shard", default="auto", choices=tuple(SHARD_CHOICES),
                   help="each rank holds only its slice of the evaluation set: on, off, or auto (default: when the "
                        "whole set does not fit a device); the loss is then the all-reduced sum over the slices / N")


def init_from_args(args: Any) -> Context | None:
    """``init`` with a CLI's --dist-backend and --dist-timeout (None in a single process)."""
    launch = launched()
    if launch is None or launch.world_size == 1:
        _timeout(args.dist_timeout)  # still check it
        return None
    return init(args.dist_backend, args.dist_timeout)


# --- provenance -------------------------------------------------------------------------------
def run_record(prior: dict[str, Any], ranks: dict[int, tuple[int, float]], backend: str = "") -> dict[str, Any]:
    """File attributes of one run: every run's world size so far, and points and busy seconds per rank."""
    sizes = prior.get("world_sizes", [])
    sizes = [int(v) for v in (sizes if isinstance(sizes, list) else [sizes])]
    rows = [{"rank": r, "points": int(p), "busy_seconds": round(float(s), 3)} for r, (p, s) in sorted(ranks.items())]
    return {"world_sizes": [*sizes, max(1, len(ranks))], "last_run_world_size": max(1, len(ranks)),
            "last_run_backend": backend, "last_run_ranks": rows}


def rank_summary(attrs: dict[str, Any]) -> str | None:
    """One line of points/s per rank for a run on many ranks (None for one process)."""
    rows, seconds = attrs.get("last_run_ranks"), float(attrs.get("last_run_seconds", 0.0))
    if isinstance(rows, str):
        rows = json.loads(rows)
    if not rows or len(rows) < 2 or seconds <= 0:
        return None
    rates = [r["points"] / seconds for r in rows]
    if len(rows) <= 8:
        each = ", ".join(f"{r['rank']}: {r['points']:,} ({rate:,.1f}/s)" for r, rate in zip(rows, rates, strict=True))
    else:
        s = sorted(rates)
        each = f"min {s[0]:,.1f}, median {s[len(s) // 2]:,.1f}, max {s[-1]:,.1f} points/s"
    return f"ranks    {len(rows)} ({attrs.get('last_run_backend', '')}); points (points/s) per rank: {each}"


# --- sharded data -----------------------------------------------------------------------------
@dataclass
class Shard(data_mod.EvalSet):
    """This rank's contiguous slice of an evaluation set; its provenance is the whole set's."""

    total: int = 0
    total_sha256: str = ""
    offset: int = 0
    shards: int = 1

    def attrs(self) -> dict[str, object]:
        return super().attrs() | {"samples": self.total, "data_sha256": self.total_sha256}

    def describe(self) -> str:
        return (f"samples {self.offset:,}-{self.offset + len(self):,} of {self.total:,} {self.name or self.source} "
                f"{self.split} samples on this rank (sharded across {self.shards} ranks), cached on {self.device.type}")


def shard_data(data: Any, shard: bool | None, batch_size: int, device: str | torch.device | None) -> Any:
    """This rank's part of ``data`` when sharding (``shard=True``, or ``None`` and the whole set does
    not fit in the device's data cache on some rank); ``data`` unchanged otherwise.

    Shards are contiguous and cut at multiples of ``batch_size`` (BN's batches in ``bn_mode='batch'``
    stay the same); tensors and ``EvalSet``s can be sharded.
    """
    if shard not in (None, True, False):
        raise UserError(f"shard must be True, False or None (automatic), not {shard!r}")
    ctx = current()
    if ctx is None:
        if shard:
            raise UserError("shard=True splits the data across the ranks of a distributed run; launch with torchrun, "
                            "or drop shard")
        return data
    if shard is False:
        return data
    full = data if isinstance(data, data_mod.EvalSet) else None
    if isinstance(data, list | tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        if data[0].shape[0] != data[1].shape[0]:
            return data  # prepare() says what is wrong
        full = data_mod.EvalSet(data[0], data[1], "tensors", name="tensors")
    if full is None or isinstance(full, Shard):
        if shard:
            raise UserError("shard=True takes (inputs, targets) tensors or a fastland.data.EvalSet; for a Dataset or "
                            "DataLoader, give each rank its part of the data yourself")
        return data
    if shard is None:
        dev = torch.device(device_name(device))
        nbytes = sum(t.numel() * t.element_size() for t in (full.inputs, full.targets))
        fits = nbytes <= data_mod.CACHE_FRACTION * free_memory(dev)
        with ctx.session() as sess:
            if all(v == "1" for v in ctx.gather("fits", "1" if fits else "0", sess.store)):
                return data
    n, w = len(full), ctx.world_size
    batches = -(-n // batch_size)
    if batches < w:
        raise UserError(f"sharding {n} samples in batches of {batch_size} gives {batches} batch(es) for {w} ranks; use "
                        "a smaller batch_size, more samples, or shard=False")
    start, stop = (min(n, batch_size * (batches * r // w)) for r in (ctx.rank, ctx.rank + 1))
    return Shard(full.inputs[start:stop], full.targets[start:stop], full.source, full.split, full.sample_seed,
                 full.mean, full.std, full.warning, full.name, total=n, total_sha256=full.fingerprint, offset=start,
                 shards=w)


# --- data-parallel Hessian-vector products ---------------------------------------------------------
def shard_batches(batches: list[Any]) -> list[Any]:
    """This rank's contiguous share of ``batches`` (whole batches: BN's batch statistics are unchanged)."""
    ctx = current()
    if ctx is None:
        return list(batches)
    b, w = len(batches), ctx.world_size
    if b < w:
        raise UserError(f"data-parallel Hessian-vector products need a batch per rank: {b} batch(es) for {w} ranks; "
                        "use a smaller batch_size or more samples")
    return list(batches)[b * ctx.rank // w : b * (ctx.rank + 1) // w]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over every rank, in place (through this rank's GPU with NCCL, the host with gloo)."""
    ctx = current()
    if ctx is None:
        return t
    buf = t if t.device == ctx.device else t.to(ctx.device)
    ctx.collective(dist.all_reduce, buf)
    if buf is not t:
        t.copy_(buf)
    return t


# --- the surface on many ranks ----------------------------------------------------------------------
def _runs(idx: np.ndarray) -> list[list[int]]:
    """Run-length code of sorted flat indices: ``[[start, length], ...]`` (the pending list, compactly)."""
    if not len(idx):
        return []
    cut = np.flatnonzero(np.diff(idx) != 1) + 1
    starts, ends = np.r_[0, cut], np.r_[cut, len(idx)]
    return [[int(idx[s]), int(e - s)] for s, e in zip(starts, ends, strict=True)]


def _unruns(runs: list[list[int]]) -> np.ndarray:
    if not runs:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(s, s + n, dtype=np.int64) for s, n in runs])


_HEAD = struct.Struct("<qqqd")  # chunk, rank, points, busy seconds


def pack_result(k: int, rank: int, loss: torch.Tensor, acc: torch.Tensor | None, seconds: float) -> bytes:
    """One finished chunk as bytes for the store queue (fp64 values; the indices are known to rank 0)."""
    body = loss.double().cpu().numpy().tobytes() + (b"" if acc is None else acc.double().cpu().numpy().tobytes())
    return _HEAD.pack(k, rank, loss.numel(), seconds) + body


def unpack_result(payload: bytes) -> tuple[int, int, np.ndarray, np.ndarray | None, float]:
    k, rank, n, seconds = _HEAD.unpack_from(payload)
    values = np.frombuffer(payload, dtype=np.float64, offset=_HEAD.size)
    return k, rank, values[:n], (values[n : 2 * n] if len(values) > n else None), seconds


class ResultWriter(threading.Thread):
    """Rank 0's writer: pops finished chunks off the store queue and writes them to the sink, so
    that computing ranks (rank 0 included) never wait for the disk."""

    def __init__(self, store: Any, chunks: list[np.ndarray], sink: Any, ranks: dict[int, tuple[int, float]],
                 bar: Any = None, on_first: Callable[[int, float], None] | None = None) -> None:
        super().__init__(name="fastland-writer", daemon=True)
        self.store, self.chunks, self.sink, self.bar, self.on_first = store, chunks, sink, bar, on_first
        self.written: set[int] = set()
        self.points = 0
        self.ranks = ranks  # rank -> (points written, busy seconds), filled as chunks arrive
        self.error: BaseException | None = None
        self._stop_after_drain = threading.Event()
        self._t0 = time.perf_counter()

    def run(self) -> None:
        step = 0
        try:
            while len(self.written) < len(self.chunks):
                try:
                    payload = self.store.queue_pop("results", block=False)
                except dist.QueueEmptyError:
                    if self._stop_after_drain.is_set():
                        return
                    time.sleep(_backoff(step))
                    step += 1
                    continue
                step = 0
                self.write(payload)
        except BaseException as err:  # noqa: BLE001 - handed to the main thread, which reports it
            self.error = err

    def write(self, payload: bytes) -> None:
        k, rank, loss, acc, seconds = unpack_result(payload)
        if k in self.written:  # never twice (a chunk is handed out once; this guards the file)
            return
        idx = self.chunks[k]
        self.sink.write(idx, loss, acc)
        self.written.add(k)
        self.points += len(idx)
        p, s = self.ranks.get(rank, (0, 0.0))
        self.ranks[rank] = (p + len(idx), s + seconds)
        if self.bar is not None:
            self.bar.update(len(idx))
        if self.on_first is not None and len(self.written) == 1:
            self.on_first(self.points, time.perf_counter() - self._t0)

    def finish(self, ctx: Context) -> None:
        """Wait until every chunk is written, checking the peers meanwhile."""
        while self.is_alive():
            self.join(0.05)
            self.check()
            ctx.check()
        self.check()

    def stop(self) -> None:
        """Write what is already queued, then end (after a failure: nothing finished is lost)."""
        self._stop_after_drain.set()
        self.join(timeout=30)

    def check(self) -> None:
        """Raise the writer's error (a full disk...) in the calling thread."""
        if self.error is not None:
            raise self.error


def _settings(attrs: dict[str, Any], dev: torch.device, **extra: Any) -> dict[str, Any]:
    out = {k: attrs.get(k) for k in surfacefile.SETTINGS}
    return out | {"device_type": dev.type} | extra


def _plan_chunk(chunk: int | None, evaluator: Any, pending: int, world: int) -> int:
    """Points per chunk: the user's, or the engine's (a few seconds of work) cut so that every rank
    gets several chunks to balance with."""
    if chunk is not None:
        return int(chunk)
    size = int(getattr(evaluator, "chunk_size", 32))
    return max(1, min(size, -(-pending // (CHUNKS_PER_RANK * world))))


def run_surface(ctx: Context, model: torch.nn.Module, space: Any, theta: torch.Tensor, dirs: torch.Tensor,
                evalset: Any, task: Any, dev: torch.device, x: np.ndarray, y: np.ndarray | None, attrs: dict[str, Any],
                dir_tensors: list[dict[str, np.ndarray]], *, out: str | Path | None, precision: str, batch_size: int,
                engine: str, strategy: str, overwrite: bool, progress: bool, chunk: int | None,
                extras: dict[str, np.ndarray] | None) -> surfacefile.Surface:
    """``fastland.api._run`` on every rank of a distributed job (see the module docstring): rank 0
    opens the file and plans, every rank evaluates, rank 0 writes; every rank returns the surface."""
    from fastland import api

    sharded = isinstance(evalset, Shard)
    nx, ny = len(x), (len(y) if y is not None else 1)
    shape = (nx,) if y is None else (ny, nx)
    path = Path(out) if out is not None else None
    writer = ctx.rank == 0
    show = progress and writer
    with ctx.session() as sess:
        sess.agree(_settings(attrs, dev, strategy=strategy, engine=engine, batch_size=batch_size, chunk=chunk,
                             overwrite=overwrite, sharded=sharded, writes_file=path is not None,
                             extras=sorted(extras or {})))
        lock, sink, started = None, None, False
        t_start, pending = time.perf_counter(), np.zeros(0, dtype=np.int64)
        stats: dict[int, tuple[int, float]] = {}
        try:
            if writer:
                state = "memory"
                if path is not None:
                    size = surfacefile.size_estimate(nx, ny, int(task.accuracy), space.numel, dirs.shape[0])
                    files.check_output_file(path, 0 if path.exists() and not overwrite else size, "out")
                    lock = files.WriteLock(path)
                    lock.acquire()
                    state, strategy = api._check_existing(path, attrs, shape, task, overwrite, strategy, engine)
                evaluator = api._make_evaluator(engine, model, space, theta, dirs, evalset, task, attrs["bn_mode"],
                                                batch_size, precision, strategy, show)
                attrs["strategy"] = getattr(evaluator, "strategy", engine)
                if state == "new":
                    surfacefile.create(path, x, y, dir_tensors, attrs, accuracy=task.accuracy, extras=dict(extras or {}))
                sink = surfacefile.Writer(path) if path is not None else api._MemorySink(shape, task.accuracy)
                pending = sink.pending()
                size = _plan_chunk(chunk, evaluator, len(pending), 1 if sharded else ctx.world_size)
                sess.publish("plan", json.dumps({"strategy": attrs["strategy"], "chunk": size, "pending": _runs(pending)}))
                if show:
                    mode = (f"data sharded across {ctx.world_size} ranks" if sharded else
                            f"{ctx.world_size} ranks pull {size}-point chunks from a shared queue, rank 0 writes")
                    print(f"plan: {nx * ny:,} points ({nx}x{ny}), {len(pending):,} to evaluate"
                          f"{' (resuming)' if state == 'resume' else ''}; {evalset.describe()}; loss {task.name}; "
                          f"device {attrs['device']}; engine {engine} ({attrs['precision']}); bn_mode {attrs['bn_mode']}; "
                          f"{mode} ({ctx.backend}){f'; out {path}' if path else ''}", flush=True)
            else:
                # Built while rank 0 opens the file: its strategy is rank 0's unless rank 0 tunes, or
                # resumes a file made with another one (then built again).
                evaluator = None if strategy == "tune" else api._make_evaluator(
                    engine, model, space, theta, dirs, evalset, task, attrs["bn_mode"], batch_size, precision,
                    strategy, False)
                plan = json.loads(sess.fetch("plan"))
                if evaluator is None or getattr(evaluator, "strategy", plan["strategy"]) != plan["strategy"]:
                    evaluator = api._make_evaluator(engine, model, space, theta, dirs, evalset, task, attrs["bn_mode"],
                                                    batch_size, precision, plan["strategy"], False)
                pending, size = _unruns(plan["pending"]), int(plan["chunk"])
            chunks = [pending[i : i + size] for i in range(0, len(pending), size)]
            t_start, started = time.perf_counter(), True
            if sharded:
                _run_sharded(ctx, evaluator, evalset, chunks, x, y, sink, show, stats)
            else:
                _run_queue(ctx, sess, evaluator, chunks, x, y, sink, show, stats)
        except PeerLost as err:
            hint = f"; finished chunks are saved in {path}: {_resume_hint()}" if path and started else ""
            raise PeerLost(f"{err}{hint}") from None
        finally:
            if sink is not None:
                elapsed = time.perf_counter() - t_start
                prior = sink.attrs()
                sink.finish({"wall_time": float(prior.get("wall_time", 0.0)) + elapsed, "last_run_seconds": elapsed,
                             "last_run_points": int(len(pending)),
                             "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                             **run_record(prior, {r: stats.get(r, (0, 0.0)) for r in range(ctx.world_size)}, ctx.backend)})
            if lock is not None:
                lock.release()
        directions = [space.unflatten_state(d) for d in dirs]
        if writer:
            if path is not None:
                result = surfacefile.read(path, directions=True)
            else:
                assert isinstance(sink, api._MemorySink)
                result = surfacefile.Surface(x, y, sink.loss, {"accuracy": sink.acc} if sink.acc is not None else {},
                                             sink.done, attrs | sink.extra_attrs, None, directions, dict(extras or {}))
            # Every rank returns the surface: 17 B a point through the store (once per run).
            sess.publish("final", pickle.dumps({"loss": result.loss, "metrics": result.metrics, "done": result.done,
                                                "attrs": result.attrs, "extras": result.extras}))
            return result
        got = pickle.loads(sess.fetch("final"))
        return surfacefile.Surface(x, y, got["loss"], got["metrics"], got["done"], got["attrs"], path, directions,
                                   got["extras"])


def _resume_hint() -> str:
    restarts, attempt = (int(os.environ.get(k, "0") or 0) for k in ("TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RESTART_COUNT"))
    if attempt < restarts:
        return "torchrun restarts the job, which resumes from there"
    return "run the same command again to resume"


def _run_queue(ctx: Context, sess: Session, evaluator: Any, chunks: list[np.ndarray], x: np.ndarray,
               y: np.ndarray | None, sink: Any, show: bool, stats: dict[int, tuple[int, float]]) -> None:
    """Every rank pulls chunks until the queue is empty; rank 0's writer thread writes them and
    fills ``stats`` (rank -> points, busy seconds); the other ranks fill their own entry."""
    from tqdm import tqdm

    from fastland import api

    total = sum(len(c) for c in chunks)
    writer = None
    if ctx.rank == 0:
        bar = tqdm(total=total, unit="pt", desc="surface", dynamic_ncols=True, file=sys.stderr, disable=not show)

        def first(points: int, seconds: float) -> None:
            if show and total > points and seconds > 0:
                bar.write(f"first chunk written after {api.fmt_time(seconds)}; with {ctx.world_size} ranks about "
                          f"{api.fmt_time(seconds * total / points / ctx.world_size)} in all")

        writer = ResultWriter(sess.client(), chunks, sink, stats, bar, first)
        writer.start()
    try:
        while True:
            ctx.check()
            if writer is not None:
                writer.check()
            k = sess.claim()
            if k >= len(chunks):
                break
            t0 = time.perf_counter()
            loss, acc = evaluator.evaluate(api.grid_coords(chunks[k], x, y))
            seconds = time.perf_counter() - t0
            sess.push(pack_result(k, ctx.rank, loss, acc, seconds))
            if writer is None:
                p, s = stats.get(ctx.rank, (0, 0.0))
                stats[ctx.rank] = (p + len(chunks[k]), s + seconds)
        if writer is not None:
            writer.finish(ctx)
    finally:
        if writer is not None:
            writer.stop()
            writer.bar.close()


def _run_sharded(ctx: Context, evaluator: Any, evalset: Shard, chunks: list[np.ndarray], x: np.ndarray,
                 y: np.ndarray | None, sink: Any, show: bool, stats: dict[int, tuple[int, float]]) -> None:
    """Every rank evaluates every chunk on its shard; an all-reduce of the per-point sums, divided
    by the global N, gives the means; rank 0 writes them."""
    from tqdm import tqdm

    from fastland import api

    n_here, n_all = len(evalset), evalset.total
    bar = tqdm(total=sum(len(c) for c in chunks), unit="pt", desc="surface", dynamic_ncols=True, file=sys.stderr,
               disable=not show)
    try:
        for idx in chunks:
            ctx.check()
            t0 = time.perf_counter()
            loss, acc = evaluator.evaluate(api.grid_coords(idx, x, y))
            # The evaluator gives means over this shard: back to sums (the correct counts exactly).
            sums = torch.stack([loss.double() * n_here,
                                (acc.double() * n_here / 100.0).round() if acc is not None else torch.zeros_like(loss)])
            sums = ctx.collective(_all_reduce, sums.to(ctx.device)).cpu()
            seconds = time.perf_counter() - t0
            for r in range(ctx.world_size):  # every rank evaluated every point (on its part of the data)
                p, s = stats.get(r, (0, 0.0))
                stats[r] = (p + len(idx), s + seconds)
            if sink is not None:
                sink.write(idx, (sums[0] / n_all).numpy(), (100.0 * sums[1] / n_all).numpy() if acc is not None else None)
            bar.update(len(idx))
    finally:
        bar.close()


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t
