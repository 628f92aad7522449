"""The benchmark suite: ``pytest benchmarks --benchmark-only`` runs every ``bench_*.py`` here.

- Collects ``bench_*.py`` (pytest's default pattern is ``test_*.py``); a file named on the
  command line is collected once, by pytest itself.
- ``--gpu-sizes``: the sizes of the performance targets (10,000 images, full 201×201 grids,
  VGG-16-BN 51×51) instead of the CPU sizes that keep the suite within ~10 minutes on 2 cores.
  Benchmarks read it with the ``gpu_sizes`` fixture (or ``config.getoption("--gpu-sizes")``).
- ``--tiny``: the sizes of the GPU runner's dry run (``benchmarks/gpu.sh --dry-run``), which only
  checks that the scripts work.
- ``FASTLAND_BENCH_THREADS=N`` sets torch's CPU threads (on a shared 2-core machine one
  thread gives steadier numbers); ``FASTLAND_BENCH_DEVICE=cpu|cuda`` picks the device in
  the bench modules.
- ``cuda``-marked cases are skipped without a CUDA device.
- Caches (inductor, matplotlib) stay in the repository's ignored ``.cache/``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_ROOT / ".cache" / "inductor"))
os.environ.setdefault("MPLCONFIGDIR", str(_ROOT / ".cache" / "matplotlib"))
os.environ.setdefault("XDG_CACHE_HOME", str(_ROOT / ".cache"))

import torch  # noqa: E402  (after the cache locations are set)

if os.environ.get("FASTLAND_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FASTLAND_BENCH_THREADS"]))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--gpu-sizes", action="store_true", default=False,
                     help="benchmark at the performance targets' sizes (10,000 images, full grids); default: CPU sizes")
    parser.addoption("--tiny", action="store_true", default=False,
                     help="the GPU runner's dry-run sizes (seconds on a CPU; the numbers mean nothing): bench_train.py")


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Record what the numbers depend on: device, torch, threads, sizes and how busy the machine was."""
    from importlib.metadata import PackageNotFoundError, version

    from fastland import device as device_mod

    dev = torch.device(os.environ.get("FASTLAND_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        ll = version("loss-landscapes")
    except PackageNotFoundError:
        ll = "not installed"
    machine_info["fastland"] = {
        "device": device_mod.describe(dev), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "gpu_sizes": bool(config.getoption("--gpu-sizes")), "loss_landscapes": ll,
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
    }


@pytest.fixture(scope="session")
def gpu_sizes(request: pytest.FixtureRequest) -> bool:
    """Whether ``--gpu-sizes`` was given."""
    return bool(request.config.getoption("--gpu-sizes"))
