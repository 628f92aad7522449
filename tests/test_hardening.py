"""Issue 16 for the surface and train CLIs: every bad input one line, no result silently wrong, nothing lost.

Each case runs the real command through a real interpreter (``run_cli``; concurrent writers are
two real processes) and checks one ``error:`` line on stderr, a non-zero exit, no traceback, no
temporary file left, and, where data could be lost, the surviving file's contents. The data are
a tiny ImageFolder tree (60 train / 30 test PNGs of 32x32) and LeNet-BN, so that a command takes
the interpreter's start-up and little more. Full-disk cases mount a small tmpfs (root) and skip
where mounting is refused.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import done_count, error_lines, mounted_tmpfs, one_error_line, run_cli
from torch import nn

import fastland
from fastland import data as data_mod
from fastland import models, probes
from fastland import train as train_mod
from fastland.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = ["--res", "31", "--chunk", "16"]  # 961 points: a few seconds, long enough to stop or kill mid-way
TOTAL = 31 * 31
# Attributes that say when and how long, not what: the only ones two runs of one command may differ in.
VOLATILE = {"created", "finished", "wall_time", "last_run_seconds", "last_run_points", "last_run_ranks", "world_sizes"}


@dataclass
class Lab:
    root: Path
    images: Path
    env: dict[str, str]
    ckpt: Path
    run: Path  # a finished 2-epoch training run (no probes), copied and damaged by the resume cases
    reference: Path  # the surface of ``surface_args + GRID``, uninterrupted

    @property
    def data(self) -> list[str]:
        return ["--data", f"imagefolder:{self.images}", "--device", "cpu"]

    @property
    def surface_args(self) -> list[str]:
        return ["--checkpoint", str(self.ckpt), *self.data, "--samples", "all", "--no-render"]

    @property
    def train_args(self) -> list[str]:
        return ["--model", "lenet_bn", *self.data, "--batch", "16"]

    def evalset(self) -> data_mod.EvalSet:
        return data_mod.load(f"imagefolder:{self.images}", "train", "all")


def _write_images(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        for c in range(10):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = (rng.random((32, 32, 3)) * 128 + 12 * c).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    root = tmp_path_factory.mktemp("hardening")
    images = root / "images"
    _write_images(images)
    env = {"FASTLAND_OFFLINE": "1", "FASTLAND_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTLAND_CACHE", env["FASTLAND_CACHE"])
        cfg = TrainConfig(model="lenet_bn", data=f"imagefolder:{images}", epochs=2, batch=16, device="cpu")
        final = train_mod.train(cfg, root / "run", progress=False)
    lab = Lab(root, images, env, final, root / "run", root / "reference.h5")
    done = run_cli("fastland.surface", [*lab.surface_args, *GRID, "--out", str(lab.reference)], root, env)
    assert done.returncode == 0, done.stderr
    return lab


# --- helpers --------------------------------------------------------------------------------
def start(module: str, args: list[str], cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen, Path, Path]:
    """``python -m MODULE ARGS`` in the background; its stdout and stderr go to files (never a full pipe)."""
    out, err = cwd / f"{module}-{time.monotonic_ns()}.out", cwd / f"{module}-{time.monotonic_ns()}.err"
    with open(out, "w") as o, open(err, "w") as e:
        p = subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, stdout=o, stderr=e,
                             env={**os.environ, **env})
    return p, out, err


def wait_for(what: Callable[[], bool], p: subprocess.Popen, timeout: float = 300) -> None:
    """Poll ``what`` until it holds; fail if the process ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not what():
        assert p.poll() is None, f"the process ended (exit {p.returncode}) before the moment the test waits for"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def datasets(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of an HDF5 file by its full name (directions included)."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[...]) if isinstance(obj, h5py.Dataset) else None)
    return out


def attributes(path: Path) -> dict[str, str]:
    with h5py.File(path, "r") as f:
        return {k: str(v) for k, v in f.attrs.items()}


def assert_same_surface(a: Path, b: Path) -> None:
    """Bit-identical datasets; attributes identical except when and how long (``VOLATILE``)."""
    da, db = datasets(a), datasets(b)
    assert sorted(da) == sorted(db)
    for name in da:
        assert da[name].dtype == db[name].dtype and np.array_equal(da[name], db[name], equal_nan=True), name
    aa, ab = attributes(a), attributes(b)
    assert sorted(aa) == sorted(ab)
    assert {k for k in aa if aa[k] != ab[k]} <= VOLATILE, {k: (aa[k], ab[k]) for k in aa if aa[k] != ab[k]}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[Path]:
    """Temporary files a run left behind."""
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]


def run_many(jobs: list[tuple[str, list[str], Path]], env: dict[str, str]) -> list[subprocess.CompletedProcess]:
    """Several independent commands, two at a time (each is mostly the interpreter's start-up)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda job: run_cli(job[0], job[1], job[2], env), jobs))


def dead_pid() -> int:
    """The id of a process that has ended (what a killed run's temporary files are named after)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def fill(folder: Path) -> None:
    """Take every free byte of ``folder``'s file system, as another program writing would."""
    import os

    fd = os.open(os.path.join(folder, "filler"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for block in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, bytes(block))
            except OSError:
                pass
    finally:
        os.close(fd)


# --- results that were silently wrong ---------------------------------------------------------
def test_to_never_resumes_a_file_of_another_target_and_ends_at_its_target(lab: Lab, tmp_path: Path) -> None:
    """A line for --to b is refused for --to c (it used to report b's losses as c's), and is left as it was;
    with BN, α = 1 gives the --to model's own loss (its running statistics are interpolated too)."""
    b = models.save_checkpoint(tmp_path / "b.pt", "lenet_bn", models.randomized("lenet_bn", 1))
    c = models.save_checkpoint(tmp_path / "c.pt", "lenet_bn", models.randomized("lenet_bn", 2))
    line, start = tmp_path / "line.h5", tmp_path / "start.h5"
    base = [*lab.surface_args, "--res", "3", "--range", "0", "1"]
    first, kept_stats = run_many([("fastland.surface", [*base, "--to", str(b), "--out", str(line)], tmp_path),
                                  ("fastland.surface", [*base, "--to", str(b), "--bn-stats", "start", "--out", str(start)],
                                   tmp_path)], lab.env)
    assert first.returncode == 0 and kept_stats.returncode == 0, first.stderr + kept_stats.stderr
    before = sha256(line)
    one_error_line(run_cli("fastland.surface", [*base, "--to", str(c), "--out", str(line)], tmp_path, lab.env),
                   "interpolation_target_sha256")
    assert sha256(line) == before  # the file of --to b is untouched

    s = fastland.load(line)
    evalset = lab.evalset()
    target, _, _ = models.load_checkpoint(b)
    start_model, _, _ = models.load_checkpoint(lab.ckpt)
    assert s.attrs["bn_stats"] == "interpolate" and s.attrs["interpolation_target"] == str(b)
    assert s.loss[0] == pytest.approx(fastland.evaluate(start_model, evalset)["loss"], rel=1e-5)
    assert s.loss[-1] == pytest.approx(fastland.evaluate(target, evalset)["loss"], rel=1e-5)
    kept = fastland.load(start)  # --bn-stats start: --checkpoint's statistics all along, so α = 1 is not the target
    assert kept.attrs["bn_stats"] == "start" and kept.loss[0] == pytest.approx(s.loss[0], rel=1e-6)
    assert abs(kept.loss[-1] - s.loss[-1]) > 1e-3 * s.loss[-1]


def test_bn_stats_is_explained_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    from fastland import surface

    text = " ".join(surface.build_parser().format_help().split())
    for needle in ("--bn-stats", "interpolate moves BN's running statistics", "α=1 is exactly the --to model",
                   "start keeps --checkpoint's statistics", "auto (default)"):
        assert needle in text, needle


def test_a_second_writer_is_stopped_and_the_first_is_unharmed(lab: Lab, tmp_path: Path) -> None:
    """While one process writes a surface, a second one (even with --overwrite) is told so and exits;
    ``fastland.viz`` draws the points done so far; the first finishes the very file an undisturbed run
    writes: two runs of one command (strategy auto) give bit-identical datasets."""
    out = tmp_path / "s.h5"
    args = [*lab.surface_args, *GRID, "--out", str(out)]
    p, _, err = start("fastland.surface", args, tmp_path, lab.env)
    try:
        wait_for(lambda: done_count(out) >= 16, p)
        p.send_signal(signal.SIGSTOP)  # the first writer holds the file, mid-way, for as long as the test needs
        second, viz = run_many([("fastland.surface", [*args, "--overwrite"], tmp_path),
                                ("fastland.viz", [str(out), "--map", str(tmp_path / "map.png")], tmp_path)], lab.env)
        one_error_line(second, f"another fastland process (pid {p.pid}) is writing {out}")
        assert viz.returncode == 0 and (tmp_path / "map.png").stat().st_size > 10_000, viz.stderr
        assert 16 <= done_count(out) < TOTAL
    finally:
        p.send_signal(signal.SIGCONT)
    assert p.wait(timeout=600) == 0, err.read_text()
    assert_same_surface(out, lab.reference)  # the same command, stopped for a while: the same file


def test_a_killed_run_resumes_to_the_same_file(lab: Lab, tmp_path: Path) -> None:
    """A run killed with SIGKILL part-way and run again (strategy auto, kept in the file) writes the
    datasets of an uninterrupted run, bit for bit; only the attributes in ``VOLATILE`` differ."""
    args = [*lab.surface_args, *GRID]
    assert attributes(lab.reference)["strategy"] == "loop"

    killed = tmp_path / "killed.h5"
    p, _, _ = start("fastland.surface", [*args, "--out", str(killed)], tmp_path, lab.env)
    wait_for(lambda: done_count(killed) >= 48, p)
    p.kill()
    p.wait(timeout=60)
    done = done_count(killed)
    assert 48 <= done < TOTAL, f"the run was not killed mid-way (done={done})"
    stale = tmp_path / f".killed.h5.{dead_pid()}.tmp"  # as a run killed while creating the file leaves it
    stale.write_bytes(b"half a file")
    resumed = run_cli("fastland.surface", [*args, "--out", str(killed)], tmp_path, lab.env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{TOTAL - done:,} to evaluate (resuming)" in resumed.stdout
    assert_same_surface(killed, lab.reference)
    assert not leftovers(tmp_path)


def test_two_trainings_in_one_folder_and_auto_probes_repeat(lab: Lab, tmp_path: Path) -> None:
    """A second ``fastland.train`` into a folder being trained stops with one line and harms nothing; the
    same command (``--probe-mode auto``) run twice writes the same metrics.csv and weights."""
    args = [*lab.train_args, "--epochs", "6"]
    p, out, err = start("fastland.train", [*args, "--out", "run"], tmp_path, lab.env)
    try:
        wait_for(lambda: "epoch 1/6" in out.read_text(), p)
        p.send_signal(signal.SIGSTOP)
        one_error_line(run_cli("fastland.train", [*args, "--out", "run"], tmp_path, lab.env),
                       f"another fastland process (pid {p.pid}) is writing run")
    finally:
        p.send_signal(signal.SIGCONT)
    assert p.wait(timeout=600) == 0, err.read_text()
    twin = run_cli("fastland.train", [*args, "--out", "twin"], tmp_path, lab.env)
    assert twin.returncode == 0, twin.stderr
    a, b = tmp_path / "run", tmp_path / "twin"
    assert (a / "metrics.csv").read_bytes() == (b / "metrics.csv").read_bytes()
    assert len((a / "metrics.csv").read_text().splitlines()) == 1 + 6 * 4  # every step of 6 epochs of 4 batches
    assert json.loads((a / "metrics.json").read_text())["chosen"] == "layered"  # auto on the CPU, for a flat Sequential
    wa, wb = models.read_checkpoint(a / "final.pt")["state_dict"], models.read_checkpoint(b / "final.pt")["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# --- full disks ----------------------------------------------------------------------------------
def test_full_disk_while_training_names_the_file_and_keeps_the_run(lab: Lab, tmp_path: Path) -> None:
    """The disk fills up mid-run (another program): one line naming the file, no temporary file, the
    epochs and probe rows recorded are kept, and the same command resumes once there is room."""
    with mounted_tmpfs(tmp_path / "disk", "32m") as disk:
        run = disk / "run"
        args = [*lab.train_args, "--epochs", "16", "--probe-every", "2", "--out", str(run)]
        p, out, err = start("fastland.train", args, tmp_path, lab.env)
        try:
            wait_for(lambda: "epoch 1/16" in out.read_text(), p)
            p.send_signal(signal.SIGSTOP)
            fill(disk)
        finally:
            p.send_signal(signal.SIGCONT)
        p.wait(timeout=600)
        done = subprocess.CompletedProcess(args, p.returncode, out.read_text(), err.read_text())
        line = one_error_line(done, "the disk is full")
        assert f"cannot write or read {run}/" in line and "finished work is kept" in line
        assert not leftovers(disk)
        assert models.read_checkpoint(run / "epoch_001.pt")["meta"]["epoch"] == 1
        rows = [r for r in (run / "metrics.csv").read_text().split("\n")[1:] if r.count(",") == 25]
        assert len(rows) >= 2  # epoch 1 probed steps 0 and 2
        (disk / "filler").unlink()
        (run / f".epoch_005.pt.{dead_pid()}.tmp").write_bytes(b"half a checkpoint")  # as a kill -9 mid-save leaves
        resumed = run_cli("fastland.train", args, tmp_path, lab.env)
        assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr
        assert len(probes.read_metrics(run / "metrics.csv")["step"]) == 16 * 2 and not leftovers(disk)


def test_full_disk_before_and_while_writing_the_surface(lab: Lab, tmp_path: Path) -> None:
    """Too small a disk is refused before any work, with the sizes; a disk that fills up while the
    file is created gives one line naming it (not HDF5's two-line error and h5py's tracebacks),
    and leaves neither the file nor a temporary one; a disk that fills up after the file was
    created stops nothing, since every value has its place in the file from the start."""
    args = [*lab.surface_args, "--res", "5", "--out"]
    with mounted_tmpfs(tmp_path / "small", "64k") as small:
        line = one_error_line(run_cli("fastland.surface", [*args, str(small / "s.h5")], tmp_path, lab.env),
                              f"{small / 's.h5'}: needs about")
        assert "free some space or choose another place" in line and not list(small.iterdir())
    with mounted_tmpfs(tmp_path / "disk", "2m") as disk:
        out = disk / "s.h5"
        # Another program fills the disk between the up-front check and the write: surfacefile.create
        # is wrapped to do that first, then runs as it is.
        code = (f"import sys\nfrom pathlib import Path\nimport fastland.surfacefile as sf\n{inspect.getsource(fill)}\n"
                "real = sf.create\n"
                "def create(path, *a, **k):\n"
                "    fill(Path(path).parent)\n"
                "    return real(path, *a, **k)\n"
                "sf.create = create\n"
                "from fastland.surface import main\n"
                "main(sys.argv[1:])\n")
        done = subprocess.run([sys.executable, "-c", code, *args, str(out)], cwd=tmp_path, capture_output=True,
                              text=True, env={**os.environ, **lab.env}, timeout=600)
        one_error_line(done, f"cannot write or read {out}: the disk is full")
        assert sorted(p.name for p in disk.iterdir()) == [".s.h5.lock", "filler"]
        (disk / "filler").unlink()

        p, _, err = start("fastland.surface", [*lab.surface_args, *GRID, "--out", str(out)], tmp_path, lab.env)
        try:
            wait_for(lambda: done_count(out) >= 16, p)
            p.send_signal(signal.SIGSTOP)
            fill(disk)
        finally:
            p.send_signal(signal.SIGCONT)
        assert p.wait(timeout=600) == 0, err.read_text()
        assert "Traceback" not in err.read_text()
        ref, got = datasets(lab.reference), datasets(out)
        assert all(np.array_equal(ref[k], got[k], equal_nan=True) for k in ref)


# --- refused up front, in one line, leaving nothing behind --------------------------------------
SURFACE_REFUSALS = [
    (["--res", "100000"], "a 100000x100000 grid needs about 381.8 GiB of memory, but only"),
    (["--range", "-inf", "1"], "--range values must be finite numbers, got -inf 1.0"),
    (["--bn-mode", "batch", "--batch-size", "59", "--res", "3", "--out", "b.h5"], "leave a last batch of one sample"),
    (["--res", "3", "--out", "adir"], "--out adir is a folder"),
    (["--res", "3", "--out", "/proc/fastland.h5"], "--out /proc/fastland.h5 cannot be written"),
]


def test_surface_refusals(lab: Lab, tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    done = run_many([("fastland.surface", [*lab.surface_args, *args], tmp_path) for args, _ in SURFACE_REFUSALS], lab.env)
    for (args, needle), d in zip(SURFACE_REFUSALS, done, strict=True):
        line = one_error_line(d, needle)
        if "100000" in args:
            assert "the limit is 80% of that" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"] and not list((tmp_path / "adir").iterdir())


def test_train_refusals(lab: Lab, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a folder")
    cases = [(["--out", "afile"], "--out afile is a file, not a folder"),
             (["--out", "afile/run"], "--out afile/run: afile is a file, not a folder"),
             (["--out", "/proc/fastland-run"], "--out /proc/fastland-run cannot be written")]
    done = run_many([("fastland.train", [*lab.train_args, "--epochs", "1", *args], tmp_path) for args, _ in cases], lab.env)
    for (_, needle), d in zip(cases, done, strict=True):
        one_error_line(d, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_read_only_outputs(lab: Lab, tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "ro", "1m") as ro:
        if subprocess.run(["mount", "-o", "remount,ro", str(ro)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount the tmpfs read-only")
        done = run_many([("fastland.surface", [*lab.surface_args, "--res", "3", "--out", str(ro / "s.h5")], tmp_path),
                         ("fastland.train", [*lab.train_args, "--epochs", "1", "--out", str(ro / "run")], tmp_path)],
                        lab.env)
        one_error_line(done[0], f"--out {ro / 's.h5'} cannot be written: read-only file system")
        one_error_line(done[1], f"--out {ro / 'run'} cannot be written: read-only file system")
        # A read-only cache folder is a warning, not a failure: the images are decoded again next time.
        cached = run_cli("fastland.surface", [*lab.surface_args, "--res", "3", "--out", "s.h5"], tmp_path,
                         {**lab.env, "FASTLAND_CACHE": str(ro / "cache")})
        assert cached.returncode == 0 and (tmp_path / "s.h5").is_file(), cached.stderr
        assert error_lines(cached.stderr) == [f"warning: could not cache the decoded images in {ro / 'cache'} "
                                              "(Read-only file system); they will be decoded again next time"]


def _without(name: str) -> Callable[[h5py.File], None]:
    return lambda f: f.__delitem__(name)


def _reshaped(f: h5py.File) -> None:
    del f["done"]
    f["done"] = np.zeros((3, 3), dtype=np.uint8)


def test_resuming_a_damaged_surface_file_is_refused_and_the_file_kept(lab: Lab, tmp_path: Path) -> None:
    """A file to resume that lacks ``done`` or ``train_loss``, or whose grid has another shape."""
    cases = [("no-done", _without("done"), "lacks done: it is not a complete fastland surface file"),
             ("no-loss", _without("train_loss"), "lacks train_loss: it is not a complete fastland surface file"),
             ("shape", _reshaped, "done has shape (3, 3) but this command's grid is (31, 31)")]
    for name, damage, _ in cases:
        shutil.copy(lab.reference, tmp_path / f"{name}.h5")
        with h5py.File(tmp_path / f"{name}.h5", "r+") as f:
            damage(f)
    before = {name: sha256(tmp_path / f"{name}.h5") for name, _, _ in cases}
    done = run_many([("fastland.surface", [*lab.surface_args, *GRID, "--out", f"{name}.h5"], tmp_path)
                     for name, _, _ in cases], lab.env)
    for (name, _, needle), d in zip(cases, done, strict=True):
        one_error_line(d, f"{name}.h5{':' if name == 'shape' else ''} {needle}")
        assert sha256(tmp_path / f"{name}.h5") == before[name]
    assert not leftovers(tmp_path)


def test_a_resume_with_other_settings_is_refused_and_the_file_kept(lab: Lab, tmp_path: Path) -> None:
    """Every setting that changes a value is checked before a file is resumed (or, for the strategy,
    kept): otherwise '0 to evaluate (resuming)' would report one computation as another."""
    cases = [(["--precision", "bf16"], "precision: file has 'fp32', command wants 'bf16'"),
             (["--sample-seed", "1"], "sample_seed: file has 0, command wants 1"),
             (["--bn-mode", "batch", "--batch-size", "30"], "bn_mode: file has 'eval', command wants 'batch'"),
             (["--strategy", "vmap"], "was computed with the loop strategy; resume it with that one")]
    for k in range(len(cases)):
        shutil.copy(lab.reference, tmp_path / f"{k}.h5")
    before = sha256(lab.reference)
    done = run_many([("fastland.surface", [*lab.surface_args, *GRID, *args, "--out", f"{k}.h5"], tmp_path)
                     for k, (args, _) in enumerate(cases)], lab.env)
    for k, ((_, needle), d) in enumerate(zip(cases, done, strict=True)):
        one_error_line(d, needle)
        assert sha256(tmp_path / f"{k}.h5") == before


def _resumable(lab: Lab, folder: Path) -> Path:
    """A copy of the lab's 2-epoch run stopped after epoch 1."""
    shutil.copytree(lab.run, folder, ignore=shutil.ignore_patterns(".*"))
    (folder / "final.pt").unlink()
    (folder / "epoch_002.pt").unlink()
    return folder


def _edit_checkpoint(path: Path, edit: Callable[[dict], None]) -> None:
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, path)


def test_damaged_checkpoints_and_configs(lab: Lab, tmp_path: Path) -> None:
    """A state_dict that is not a dict (surface and train), an empty or corrupt config.json, a checkpoint
    without (or with a foreign) optimizer state: one line each, and every file left as it was."""
    bad = tmp_path / "bad.pt"
    shutil.copy(lab.ckpt, bad)
    _edit_checkpoint(bad, lambda c: c.__setitem__("state_dict", [1, 2, 3]))
    runs = {name: _resumable(lab, tmp_path / name) for name in ("sd", "empty", "corrupt", "noopt", "badopt")}
    _edit_checkpoint(runs["sd"] / "epoch_001.pt", lambda c: c.__setitem__("state_dict", [1, 2, 3]))
    (runs["empty"] / "config.json").write_text("")
    (runs["corrupt"] / "config.json").write_text('{"model": "lenet_bn", ')
    _edit_checkpoint(runs["noopt"] / "epoch_001.pt", lambda c: c.pop("optimizer"))
    _edit_checkpoint(runs["badopt"] / "epoch_001.pt", lambda c: c.__setitem__("optimizer", "not a state"))
    before = {p: sha256(p) for p in tmp_path.rglob("*") if p.is_file()}
    train = [*lab.train_args, "--epochs", "2", "--no-probe", "--out"]
    cases = [("fastland.surface", [*lab.surface_args, "--checkpoint", str(bad), "--res", "3", "--out", "s.h5"],
              f"checkpoint {bad}: its 'state_dict' is a list, not a dict of tensors"),
             ("fastland.train", [*train, "sd"], "checkpoint sd/epoch_001.pt: its 'state_dict' is a list"),
             ("fastland.train", [*train, "empty"], "empty/config.json is empty or corrupt"),
             ("fastland.train", [*train, "corrupt"], "corrupt/config.json is empty or corrupt"),
             ("fastland.train", [*train, "noopt"], "noopt/epoch_001.pt has no optimizer state"),
             ("fastland.train", [*train, "badopt"], "badopt/epoch_001.pt holds an optimizer state or epoch record")]
    done = run_many([(m, a, tmp_path) for m, a, _ in cases], lab.env)
    for (_, _, needle), d in zip(cases, done, strict=True):
        one_error_line(d, needle)
    assert {p: sha256(p) for p in before} == before  # nothing rewritten
    assert not leftovers(tmp_path) and not (tmp_path / "s.h5").exists()
    assert all(not (r / "epoch_002.pt").exists() for r in runs.values())


# --- progress ------------------------------------------------------------------------------------
def test_training_progress_is_a_line_every_n_seconds_without_a_terminal(monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(train_mod.Progress, "LINE_SECONDS", 0.05)
    bar = train_mod.Progress(6, "epoch 1/3", enabled=True)  # stderr is captured here: not a terminal
    assert bar.bar is None
    for step in range(6):
        time.sleep(0.06 if step % 2 == 0 else 0.0)
        bar.update(2.0 - 0.1 * step)
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(line.startswith("epoch 1/3: step ") and " steps/s, ETA " in line for line in lines)
    assert lines[0].startswith("epoch 1/3: step 1/6, loss 2.0000") and lines[-1].startswith("epoch 1/3: step 5/6")
    quiet = train_mod.Progress(6, "epoch 1/3", enabled=False)
    for _ in range(6):
        time.sleep(0.02)
        quiet.update(1.0)
    assert capsys.readouterr().out == ""


def test_training_progress_is_a_bar_with_eta_on_a_terminal(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = train_mod.Progress(4, "epoch 2/3", enabled=True)
    for _ in range(4):
        bar.update(1.5)
    bar.close()
    err = capsys.readouterr().err
    assert "epoch 2/3:" in err and "/4 [00:00<" in err and "loss=1.500" in err  # tqdm's [elapsed<remaining]


# --- the probes: batched and sequential differ only by fp32 rounding ------------------------------
def _smooth_lenet_bn() -> nn.Module:
    """LeNet-BN with average pooling and softplus: no max-pool or ReLU kinks, so ∇L is smooth."""
    model = models.create("lenet_bn")
    for i, m in enumerate(model):
        if isinstance(m, nn.MaxPool2d):
            model[i] = nn.AvgPool2d(m.kernel_size, m.stride)
        elif isinstance(m, nn.ReLU):
            model[i] = nn.Softplus(beta=5)
    return model


def test_batched_and_sequential_probes_differ_by_rounding_only() -> None:
    """The bound in ``fastland.probes``' docstring: |‖g − ∇_b L(θ')‖ − ‖g − ∇_s L(θ')‖| ≤ ‖∇_b L(θ') − ∇_s L(θ')‖,
    which for a smooth loss is fp32 rounding, below 1e-5·‖∇L(θ')‖ at every η; each path is that close to
    the fp64 value too. Relative to ‖g − ∇L(θ')‖ this grows as 1/η (cancellation)."""
    torch.manual_seed(0)
    model = _smooth_lenet_bn().train()
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(20):  # a few steps into training
        x, y = torch.randn(64, 3, 32, 32, generator=gen), torch.randint(0, 10, (64,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    x, y = torch.randn(96, 3, 32, 32, generator=gen), torch.randint(0, 10, (96,), generator=gen)
    etas = (1e-4, 1e-3, 1e-2, 1e-1)
    prober = probes.SmoothnessProbe(model, etas, "batched")
    theta, g, _, weights = prober.line(model, x, y)
    _, grad_b = prober.gradients_batched(weights, x, y)
    _, grad_s = prober.gradients_sequential(weights, x, y)
    exact = probes.SmoothnessProbe(copy.deepcopy(model).double(), etas, "sequential")
    _, grad_64 = exact.gradients_sequential(weights.double(), x.double(), y)
    scale = grad_s.norm(dim=1)
    gp_b, gp_s = (grad_b - g).norm(dim=1), (grad_s - g).norm(dim=1)
    gp_64 = (grad_64 - g.double()).norm(dim=1)
    assert ((grad_b - grad_s).norm(dim=1) <= 1e-5 * scale).all()
    assert ((gp_b - gp_s).abs() <= 1e-5 * scale).all()
    assert ((gp_b.double() - gp_64).abs() <= 1e-5 * scale).all() and ((gp_s.double() - gp_64).abs() <= 1e-5 * scale).all()
    assert (gp_s / g.norm()).diff().gt(0).all()  # ‖Δ‖ grows with η: the smallest η is where rounding weighs most
