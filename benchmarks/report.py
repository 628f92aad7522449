"""Turn the engine suite's pytest-benchmark JSON into a markdown report of ratios.

Usage: ``python benchmarks/report.py RESULTS.json [-o RESULTS.md] [--command "..."]``.

Times are per grid point, from each case's *minimum* over its rounds (on a shared machine
the minimum is the least disturbed measurement) with the median alongside. FLOP/s use the
design.md cost model (MACs per image, nominal and with the factorized first layer) and are
compared to the same run's measured matmul peak.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _fmt(v: float, digits: int = 3) -> str:
    if v != v:  # NaN
        return "–"
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def _per_point(b: dict[str, Any], stat: str = "min") -> float:
    return b["stats"][stat] / b["extra_info"]["points"]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def _peak(benches: list[dict[str, Any]], dtype: str) -> float | None:
    for b in benches:
        e = b["extra_info"]
        if e.get("kind") == "peak" and e.get("dtype") == dtype:
            return e["flop"] / b["stats"]["min"]
    return None


def _gflops(b: dict[str, Any]) -> tuple[float, float]:
    """Achieved (nominal, factorized) GFLOP/s of an engine case at its minimum time."""
    e = b["extra_info"]
    work = e["points"] * e["images"] * 2 / b["stats"]["min"] / 1e9
    return e["macs_per_image"] * work, e["macs_per_image_factorized"] * work


def header(data: dict[str, Any], command: str | None) -> list[str]:
    mi = data.get("machine_info", {})
    fl = mi.get("fastland", {})
    cpu = mi.get("cpu", {}).get("brand_raw", mi.get("processor", "?"))
    lines = [f"# Engine benchmarks: {fl.get('device', '?')}, {data.get('datetime', '?')[:10]}", ""]
    lines += [f"- device: {fl.get('device', '?')} (CPU {cpu}, {fl.get('threads', '?')} torch threads)",
              f"- torch {fl.get('torch', '?')}, python {mi.get('python_version', '?')}, "
              f"pytest-benchmark {data.get('version', '?')}, loss-landscapes {fl.get('loss_landscapes', '?')}",
              f"- sizes: {'GPU (--gpu-sizes)' if fl.get('gpu_sizes') else 'CPU (default)'}; "
              f"load average at start {fl.get('loadavg_start', '?')}",
              f"- commit {data.get('commit_info', {}).get('id', '?')[:12]}"
              f"{' (dirty)' if data.get('commit_info', {}).get('dirty') else ''}"]
    if command:
        lines.append(f"- command: `{command}`")
    return lines + ["", "Times are the minimum over each case's rounds (median in brackets).", ""]


def compare_section(benches: list[dict[str, Any]]) -> list[str]:
    rows = [b for b in benches if b["extra_info"].get("kind") == "compare"]
    if not rows:
        return []
    by = {b["extra_info"]["impl"]: b for b in rows}
    e0 = rows[0]["extra_info"]
    eng = by.get("engine")
    out = [f"## Same model, same data, same points: {e0['model']}, {e0['images']} images, {e0['points']} grid points", ""]
    table = []
    for impl in ("engine", "reference", "li_et_al_loop", "loss_landscapes"):
        if impl not in by:
            continue
        b = by[impl]
        t, med = _per_point(b), _per_point(b, "median")
        speed = _per_point(b) / _per_point(eng) if eng else float("nan")
        table.append([impl, f"{t * 1e3:.3f} ({med * 1e3:.3f})", _fmt(1 / t), f"{speed:.1f}×"])
    out += _table(["implementation", "ms per grid point", "grid points/s", "engine is faster by"], table)
    if eng and "loss_landscapes" in by:
        r = _per_point(by["loss_landscapes"]) / _per_point(eng)
        out += [f"Engine vs `loss-landscapes` per grid point: **{r:.1f}×** (target ≥ 3× on the 2-core CPU: "
                f"{'met' if r >= 3 else 'NOT met'}). Engine strategy `{eng['extra_info']['strategy']}`, "
                f"{eng['extra_info']['precision']}, built in {eng['extra_info'].get('build_seconds', '?')} s "
                "(not included).", ""]
    return out


TARGETS = {"lenet": 5.0, "resnet20_bn": 1.5}  # engine vs loss-landscapes per grid point (design.md)


def side_by_side_section(benches: list[dict[str, Any]]) -> list[str]:
    """The interleaved comparisons: every candidate took turns in one process, best round each."""
    out: list[str] = []
    for b in (b for b in benches if b["extra_info"].get("kind") == "side_by_side"):
        e = b["extra_info"]
        ms = e["ms_per_point"]
        out += [f"## Side by side (interleaved, best of {e['rounds']} rounds): {e['model']}, {e['images']} images", ""]
        table = [[impl, f"{t:.3f}", _fmt(1e3 / t), f"{t / ms['engine']:.2f}×"] for impl, t in
                 sorted(ms.items(), key=lambda kv: kv[1])]
        out += _table(["implementation", "ms per grid point", "grid points/s", "engine is faster by"], table)
        if "loss_landscapes" in ms:
            r = ms["loss_landscapes"] / ms["engine"]
            goal = TARGETS.get(e["model"])
            met = "" if goal is None else f" (target ≥ {goal}×: {'met' if r >= goal else 'NOT met'})"
            out += [f"Engine vs `loss-landscapes` per grid point: **{r:.2f}×**{met}; engine vs one plain forward pass "
                    f"of the model: {ms['plain_forward'] / ms['engine']:.2f}×. Engine strategy `{e['strategy']}`, "
                    f"{e['precision']}.", ""]
    return out


def strategy_section(benches: list[dict[str, Any]]) -> list[str]:
    rows = [b for b in benches if b["extra_info"].get("kind") == "strategy"]
    if not rows:
        return []
    out = ["## Strategies: what `auto` picks, against each one forced", ""]
    table = []
    for key in dict.fromkeys((b["extra_info"]["model"], b["extra_info"]["bn_mode"]) for b in rows):
        group = [b for b in rows if (b["extra_info"]["model"], b["extra_info"]["bn_mode"]) == key]
        forced = {b["extra_info"]["requested"]: b for b in group if b["extra_info"]["requested"] != "auto"}
        best = min(forced, key=lambda s: forced[s]["stats"]["min"]) if forced else "?"
        for b in sorted(group, key=lambda b: b["stats"]["min"]):
            e = b["extra_info"]
            us = b["stats"]["min"] / (e["points"] * e["images"]) * 1e6
            note = f"chose **{e['strategy']}**" if e["requested"] == "auto" else ("fastest forced" if e["requested"] == best else "")
            table.append([f"{key[0]} {key[1]}", e["requested"], f"{us:.2f}", _fmt(e["points"] / b["stats"]["min"]), note])
    out += _table(["model, bn_mode", "strategy", "µs per point-image", "grid points/s", ""], table)
    autos = [b for b in rows if b["extra_info"]["requested"] == "auto"]
    if autos:
        out += ["Probe timings `auto` decided on (µs per point-image): " + "; ".join(
            f"{b['extra_info']['model']} {b['extra_info']['bn_mode']}: " + ", ".join(
                f"{k} {v}" for k, v in sorted(b["extra_info"]["probe_us_per_point_image"].items(), key=lambda kv: kv[1]))
            for b in autos), ""]
    return out


def scale_p_section(benches: list[dict[str, Any]]) -> list[str]:
    rows = [b for b in benches if b["extra_info"].get("kind") == "scale_p"]
    if not rows:
        return []
    out = [f"## Scaling with P (points per call and per block): {rows[0]['extra_info']['model']}, "
           f"{rows[0]['extra_info']['images']} images", ""]
    table = []
    for b in sorted(rows, key=lambda b: (b["extra_info"]["requested"], b["extra_info"]["p"])):
        e = b["extra_info"]
        t = _per_point(b)
        table.append([e["requested"] + (f" ({e['strategy']})" if e["requested"] == "auto" else ""), str(e["p"]),
                      f"{t * 1e3:.3f}", _fmt(1 / t)])
    return out + _table(["strategy", "P", "ms per grid point", "grid points/s"], table)


def resolution_section(benches: list[dict[str, Any]]) -> list[str]:
    rows = [b for b in benches if b["extra_info"].get("kind") == "resolution"]
    if not rows:
        return []
    e0 = rows[0]["extra_info"]
    out = [f"## Scaling with resolution: {e0['model']}, {e0['images']} images, strategy {e0['strategy']}", ""]
    table = []
    for b in sorted(rows, key=lambda b: b["extra_info"]["res"]):
        e = b["extra_info"]
        t = _per_point(b)
        total = t * e["grid_points"]
        table.append([f"{e['res']}×{e['res']}", f"{e['grid_points']:,}", f"{e['points']:,}", f"{t * 1e3:.3f}",
                      f"{total:.1f}" + (" (extrapolated)" if e["extrapolated"] else "")])
    out += _table(["grid", "grid points", "points timed", "ms per grid point", "s for the whole grid"], table)
    if any(b["extra_info"]["extrapolated"] for b in rows):
        out += ["Extrapolated rows time an evenly spaced subset of the grid and multiply: the engine's cost per "
                "point does not depend on the grid (every point is a separate evaluation).", ""]
    return out


def vgg_section(benches: list[dict[str, Any]]) -> list[str]:
    rows = [b for b in benches if b["extra_info"].get("kind") == "vgg"]
    if not rows:
        return []
    e0 = rows[0]["extra_info"]
    out = [f"## VGG-16-BN: {e0['images']} images", ""]
    table = []
    for b in rows:
        e = b["extra_info"]
        t = _per_point(b)
        table.append([e["impl"], f"{e['points']}", f"{t:.3f}", f"{t * e['grid_points']:.1f}"])
    return out + _table(["implementation", "points timed", "s per grid point", "s for 51×51 (extrapolated)"], table)


def flops_section(benches: list[dict[str, Any]]) -> list[str]:
    peak32 = _peak(benches, "fp32")
    peak_tf32 = _peak(benches, "tf32")
    peak16 = _peak(benches, "bf16")
    out = ["## FLOP/s against the measured peak", ""]
    peaks = [f"fp32 {peak32 / 1e9:,.0f} GFLOP/s" if peak32 else None,
             f"tf32 {peak_tf32 / 1e9:,.0f} GFLOP/s" if peak_tf32 else None,
             f"bf16 {peak16 / 1e9:,.0f} GFLOP/s" if peak16 else None]
    out += ["Measured matmul peak in this run: " + ", ".join(p for p in peaks if p) + ".", ""]
    table = []
    for b in benches:
        e = b["extra_info"]
        if "macs_per_image" not in e or e.get("kind") not in ("compare", "resolution", "vgg", "strategy"):
            continue
        if e.get("kind") == "strategy" and e.get("requested") != "auto":
            continue
        if e.get("kind") == "resolution" and e.get("res") != 201:
            continue
        nominal, fact = _gflops(b)
        peak = {"fp32": peak32, "tf32": peak_tf32 or peak32, "bf16": peak16}.get(e["precision"]) or peak32
        frac = f"{100 * fact * 1e9 / peak:.0f}%" if peak else "–"
        table.append([b["name"].replace("test_", ""), e["model"], e["precision"], f"{nominal:,.1f}", f"{fact:,.1f}", frac])
    if not table:  # a run of other cases only (e.g. -k side_by_side): no section
        return []
    out += _table(["case", "model", "precision", "GFLOP/s (nominal MACs)", "GFLOP/s (factorized MACs)",
                   "factorized / peak"], table)
    out += ["Nominal counts every MAC of the plain model (LeNet 651.7k per image); factorized counts the work "
            "actually needed once the first layer is factorized (≈308k).", ""]
    return out


def render(data: dict[str, Any], command: str | None = None) -> str:
    benches = data["benchmarks"]
    lines = header(data, command)
    sections = (side_by_side_section, compare_section, strategy_section, scale_p_section, resolution_section,
                vgg_section, flops_section)
    for section in sections:
        lines += section(benches)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", type=Path, help="pytest-benchmark JSON (from --benchmark-json)")
    ap.add_argument("-o", "--out", type=Path, default=None, help="markdown file (default: next to the JSON)")
    ap.add_argument("--command", default=None, help="the command that produced the JSON, quoted in the report")
    args = ap.parse_args(argv)
    data = json.loads(args.json.read_text())
    # The suite's JSON may hold other modules' cases (bench_kernels.py, ...): keep this module's.
    data["benchmarks"] = [b for b in data["benchmarks"] if "bench_engine" in b.get("fullname", "")]
    out = args.out or args.json.with_suffix(".md")
    out.write_text(render(data, args.command))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
