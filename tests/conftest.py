"""Test setup: Triton runs through its interpreter without a GPU; caches stay in the repo.

Also the helpers every test file shares: ``run_main`` (a CLI in-process), ``run_cli`` (a CLI
through a real interpreter, as a user runs it), ``one_error_line`` (what a failed run must
print) and ``mounted_tmpfs`` (a small disk to fill).
"""

import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
# Must happen before any @triton.jit decorator runs, i.e. before fastland.kernels is imported.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MPLCONFIGDIR", str(_ROOT / ".cache" / "matplotlib"))
os.environ.setdefault("XDG_CACHE_HOME", str(_ROOT / ".cache"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_ROOT / ".cache" / "inductor"))
os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread() -> object:
    """One intra-op thread: on a shared 2-core machine, two threads stall on every neighbour (10-50x slower)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def run_main(main: Callable[[list[str]], None], argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Call a CLI ``main`` in-process: its exit code (0 when it returns), stdout and stderr."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def run_cli(module: str, args: list[str], cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` in ``cwd``, as a user runs it."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


# A tqdm bar's frames (written to stderr with carriage returns) are progress, not messages.
_PROGRESS = re.compile(r"\d+%\|.*\|\s*\d+/\d+ \[")


def error_lines(stderr: str) -> list[str]:
    """The non-empty lines of ``stderr``, progress-bar frames left out."""
    return [line for line in stderr.splitlines() if line.strip() and not _PROGRESS.search(line)]


def one_error_line(done: subprocess.CompletedProcess, needle: str) -> str:
    """Assert a failed run printed exactly one line on stderr, ``error: ...`` containing ``needle``, and no traceback."""
    lines = error_lines(done.stderr)
    assert done.returncode != 0, (done.stdout, done.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    return lines[0]


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, size: str = "64k") -> Iterator[Path]:
    """A small tmpfs at ``folder``, to fill up; skips the test where mounting is not allowed (e.g. without root)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("needs Linux mount for a small tmpfs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def write_image_folder(root: Path, per_split: int, classes: int = 4) -> Path:
    """An ImageFolder tree of random 32x32 PNGs (``per_split`` images per split, round-robin over ``classes``)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for i in range(per_split):
            folder = root / split / f"c{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def done_count(path: Path) -> int:
    """Grid points a surface file marks done (0 while it is not readable yet)."""
    import h5py

    try:
        with h5py.File(path, "r", locking=False) as f:
            return int(f["done"][...].sum())
    except (OSError, KeyError):
        return 0
