"""``python -m fastland.trainplots``: re-plotting saved runs, and every bad input as one line.

The audit's cases run through a real interpreter (``run_cli``); their variants in-process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import mounted_tmpfs, one_error_line, run_cli
from test_viz import image, n_colours

from fastland import probes, trainplots


def write_metrics(run: Path, rows: int = 12, k: int = 3, nan_probes: bool = False) -> Path:
    """A ``metrics.csv`` in the layout ``fastland.train`` writes, with made-up but plausible values."""
    run.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = [",".join(probes.metric_columns(k))]
    for step in range(rows):
        loss = 2.3 * np.exp(-step / 8) + 0.1
        losses = loss + rng.uniform(-0.2, 0.3, k)
        gradpred = np.full(k, np.nan) if nan_probes else rng.uniform(0.1, 2.0, k)
        beta = np.nan if nan_probes else float(rng.uniform(1, 5))
        row = [1 + step // 4, step, loss, 10 + step, 1.0, losses.min(), losses.max(), np.nanmin(gradpred) if not nan_probes
               else np.nan, np.nanmax(gradpred) if not nan_probes else np.nan, beta, *losses, *gradpred]
        lines.append(",".join(repr(float(v)) for v in row))
    path = run / "metrics.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_replot_and_where_the_figure_goes(tmp_path: Path) -> None:
    write_metrics(tmp_path / "lenet")
    write_metrics(tmp_path / "lenet_bn", nan_probes=True)  # a run whose probes never gave a finite value
    (tmp_path / "figs").mkdir()
    done = run_cli("fastland.trainplots", ["lenet", "lenet_bn", "--out", "figs"], tmp_path)  # a folder
    assert done.returncode == 0 and not done.stderr, done.stderr  # no warning for the all-NaN panels either
    assert done.stdout.strip() == "figs/smoothness.png"
    assert n_colours(image(tmp_path / "figs" / "smoothness.png")) > 50
    trainplots.main([str(tmp_path / "lenet"), "--out", str(tmp_path / "fig")])  # no suffix: a PNG
    trainplots.main([str(tmp_path / "lenet"), "--out", str(tmp_path / "f.svg")])
    assert image(tmp_path / "fig.png").shape[0] > 300
    assert (tmp_path / "f.svg").read_text().lstrip().startswith("<?xml")


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """A good run, and runs whose metrics.csv is broken in each way the audit tried."""
    write_metrics(tmp_path / "good")
    good = (tmp_path / "good" / "metrics.csv").read_text()
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "metrics.csv").write_bytes(b"\xff\xfe\x00\x81 not text \x9c\n")
    header, first, *rest = good.splitlines()
    for name, text in (("word", f"{header}\n{first}\n1,1,oops,{first.split(',', 3)[3]}\n"),
                       ("half", f"{header}\n{first}\n1,1,2.2,1"),  # a row still being written
                       ("nulls", f"{header}\n{first}\n1,\x00,2\n"),
                       ("foreign", "a,b\n1,2\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.csv").write_text(text)
    (tmp_path / "a_file").write_text("I am a file")
    return tmp_path


@pytest.mark.parametrize("args, needle, shell", [
    (["binary"], "binary/metrics.csv is not a metrics.csv written by fastland.train: it is not UTF-8 text", True),
    (["word"], "line 3 is not all numbers ('1,1,oops,", True),
    (["good", "--out", "x.xyz"], "--out x.xyz: cannot write .xyz files; use one of .avif, .eps", True),
    (["good", "--out", "a_file/fig.png"], "--out a_file/fig.png: a_file is a file, not a folder", True),
    (["good", "--out", "/proc/fig.png"], "--out /proc/fig.png cannot be written", True),
    (["half"], "line 3 has 4 values, not 16 (the run may still be writing it; try again in a moment)", False),
    (["nulls"], "is not a metrics.csv written by fastland.train", False),
    (["foreign"], "it has no step, loss, loss_min, loss_max, gradpred_min, gradpred_max, beta_smooth columns", False),
    (["good", "binary"], "it is not UTF-8 text", False),  # a second run's error, before anything is drawn
    (["missing"], "missing does not exist; train with probes on", False),
])
def test_bad_input_is_one_line_and_writes_nothing(args: list[str], needle: str, shell: bool, runs: Path, capsys,
                                                  monkeypatch) -> None:
    if "/proc" in " ".join(args) and not Path("/proc/self").exists():
        pytest.skip("no /proc here")
    before = sorted(runs.rglob("*"))
    if shell:
        one_error_line(run_cli("fastland.trainplots", args, runs), needle)
    else:
        monkeypatch.chdir(runs)
        with pytest.raises(SystemExit) as exit_:
            trainplots.main(args)
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and err.startswith("error: ") and needle in err and "\n" not in err, err
    assert sorted(runs.rglob("*")) == before


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "disk") as disk:
        yield disk


def test_full_disk_names_the_figure_and_keeps_the_old_one(tmp_path: Path, small_disk: Path) -> None:
    write_metrics(tmp_path / "lenet", rows=400)
    old = small_disk / "smoothness.png"
    old.write_bytes(b"the figure of an earlier run")
    (small_disk / "filler").write_bytes(b"x" * 40_000)  # the new figure (~100 KB) cannot fit in what is left
    done = run_cli("fastland.trainplots", ["lenet", "--out", str(old)], tmp_path)
    one_error_line(done, f"cannot write or read {old}: the disk is full")
    assert old.read_bytes() == b"the figure of an earlier run"
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "smoothness.png"]  # no temporary file left
