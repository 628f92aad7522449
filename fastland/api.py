"""fastland's public Python API: loss surfaces of any model, on any data, with any loss.

    import fastland
    surf = fastland.surface(model, (inputs, targets))          # a 51x51 filter-normalized plane
    surf.x, surf.y, surf.loss, surf.metrics["accuracy"]
    line = fastland.interpolate(model_a, model_b, data)        # the 1-D path from one model to another

``data`` is an ``(inputs, targets)`` pair of tensors, a ``Dataset``, a ``DataLoader`` or a
``fastland.data.EvalSet``; it is cached on the device when it fits and streamed otherwise.
``loss_fn`` is None (cross-entropy for integer targets, MSE for float ones), ``"cross_entropy"``,
``"mse"`` or any ``loss_fn(outputs, targets)`` returning the batch mean. The value at a grid
point is the mean loss over the whole data set. With ``out=`` the surface is written to an
HDF5 file in Li et al.'s layout, chunk by chunk: a run that is interrupted resumes when called
again with the same settings, and a file made with other settings is refused.

The command-line tools (``python -m fastland.surface``, ``fastland.study``, ...) are thin layers
over these functions.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import math
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import fastland
from fastland import data as data_mod
from fastland import device as device_mod
from fastland import directions as dir_mod
from fastland import distributed, files, losses, models, surfacefile
from fastland.engine import PRECISIONS
from fastland.engine import strategy as strategies
from fastland.errors import UserError
from fastland.losses import LossFn, Task
from fastland.params import FlatSpace
from fastland.reference import BN_MODES, ReferenceEvaluator
from fastland.surfacefile import Surface

ENGINES = ("batched", "reference")
BN_STATS = ("auto", "interpolate", "start")


# --- shared setup ------------------------------------------------------------------------
def resolve_device(device: str | torch.device | None) -> torch.device:
    """None or ``"auto"``: CUDA when present, else the CPU (under torchrun: ``cuda:LOCAL_RANK``)."""
    return device_mod.resolve(distributed.device_name(device))


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode without gradients, restored afterwards (only read, never changed)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was)


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def prepare(model: nn.Module, data: Any, loss_fn: LossFn | str | None, device: str | torch.device | None = None,
            batch_size: int = 128, cache: bool | str = "auto") -> tuple[data_mod.Data, Task, torch.device]:
    """Check ``model``, put ``data`` on the device and resolve the loss against the model's outputs.

    Shared by every entry point (surfaces, Hessians, training), so they all accept the same
    ``data`` and ``loss_fn`` and fail the same way on bad input.
    """
    if not isinstance(model, nn.Module):
        raise UserError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    if next(model.parameters(), None) is None:
        raise UserError("the model has no parameters: there is no landscape to evaluate")
    dev = resolve_device(device)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    evalset = data_mod.as_data(data, dev, cache=cache, batch_size=batch_size)
    x, y = evalset.sample(2)
    with _evaluating(model):
        try:
            out = model(x.to(_model_device(model)))
        except Exception as err:  # noqa: BLE001 - the user's model cannot take the user's inputs
            raise UserError(f"the model cannot run on the data's inputs {tuple(x.shape)} {x.dtype} "
                            f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})") from None
    task = losses.resolve(loss_fn, out, y.to(out.device) if isinstance(out, torch.Tensor) else y)
    if task.name == "cross_entropy" and evalset.cached:
        losses.check_classes(int(out.shape[1]), evalset.targets)
    return evalset, task, dev


def state_sha256(model: nn.Module) -> str:
    """sha256 of a model's parameters and buffers (names, shapes, values): which weights a file holds."""
    h = hashlib.sha256()
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        a = t.detach().cpu().contiguous()
        h.update(f"{name}{tuple(a.shape)}{a.dtype}".encode())
        h.update(a.reshape(-1).view(torch.uint8).numpy().tobytes() if a.numel() else b"")
    return h.hexdigest()


def _tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def _grid(dim: int, res: int | Sequence[int], rng: Sequence[float]) -> tuple[np.ndarray, np.ndarray | None]:
    """The coordinates: ``res`` per axis (or ``(nx, ny)``), ``range`` as ``(min, max)`` or ``(xmin, xmax, ymin, ymax)``."""
    if dim not in (1, 2):
        raise UserError(f"dim must be 1 or 2, got {dim}")
    nx, ny = (res, res) if isinstance(res, int | np.integer) else tuple(res)
    for axis, n in (("x", nx), ("y", ny))[:dim]:
        if not isinstance(n, int | np.integer) or n < 2:
            raise UserError(f"the resolution along {axis} must be an integer of at least 2, got {n!r}")
    rng = [float(v) for v in rng]
    if len(rng) not in (2, 4):
        raise UserError(f"range takes (min, max) or (xmin, xmax, ymin, ymax), got {len(rng)} numbers")
    if len(rng) == 2:
        rng = rng + rng
    if not all(math.isfinite(v) for v in rng):
        raise UserError(f"range values must be finite numbers, got {rng[:2] if dim == 1 else rng}")
    if not rng[0] < rng[1] or (dim == 2 and not rng[2] < rng[3]):
        raise UserError(f"range must be increasing and non-empty (min < max), got {rng[:2] if dim == 1 else rng}")
    x = np.linspace(rng[0], rng[1], int(nx))
    return x, (np.linspace(rng[2], rng[3], int(ny)) if dim == 2 else None)


def _check_choice(value: str, choices: Sequence[str], what: str) -> None:
    if value not in choices:
        raise UserError(f"unknown {what} {value!r}; use {', '.join(choices)}")


def _given_directions(given: Any, space: FlatSpace, device: torch.device) -> torch.Tensor:
    """User-supplied directions as ``[D, N]``: ``{name: tensor}`` dicts, flat ``[N]`` vectors, or ``[D, N]``."""
    if isinstance(given, torch.Tensor):
        rows = [given] if given.dim() == 1 else list(given)
    elif isinstance(given, Mapping):
        rows = [given]
    else:
        rows = list(given)
    if not 1 <= len(rows) <= 2:
        raise UserError(f"give one or two directions, got {len(rows)}")
    flat = []
    for r in rows:
        if isinstance(r, Mapping):
            missing = [n for n in space.names if n not in r]
            if missing:
                raise UserError(f"a direction lacks parameters {missing[:3]}; give one tensor per parameter name "
                                "(zeros where it should not move)")
            try:
                flat.append(torch.cat([torch.as_tensor(r[i.name]).reshape(-1).float() for i in space.infos]))
            except RuntimeError as err:
                raise UserError(f"a direction's tensors do not fit the model's parameters ({err})") from None
            if flat[-1].numel() != space.numel:
                raise UserError(f"a direction has {flat[-1].numel()} values, the model {space.numel}")
        else:
            t = torch.as_tensor(r).float().reshape(-1)
            if t.numel() != space.numel:
                raise UserError(f"a flat direction must have N={space.numel} values, got {t.numel()}")
            flat.append(t)
    out = torch.stack(flat).to(device)
    if not torch.isfinite(out).all():
        raise UserError("a direction holds NaN or inf values")
    return out


# --- surfaces ----------------------------------------------------------------------------
def surface(model: nn.Module, data: Any, loss_fn: LossFn | str | None = None, *, dim: int = 2,
            res: int | Sequence[int] = 51, range: Sequence[float] = (-1.0, 1.0), norm: str = "filter",  # noqa: A002
            ignore: str = "biasbn", seed: int = 0, bn_mode: str = "eval", out: str | Path | None = None,
            device: str | torch.device | None = None, precision: str = "auto", directions: Any = None,
            batch_size: int = 128, engine: str = "batched", strategy: str = "auto", overwrite: bool = False,
            progress: bool = True, chunk: int | None = None, attrs: Mapping[str, Any] | None = None,
            extras: Mapping[str, np.ndarray] | None = None, shard: bool | None = None) -> Surface:
    """The loss of ``model`` on ``data`` over a 1-D or 2-D grid around its weights θ (Li et al. 2018).

    ``f(α) = L(θ + α·δ)`` or ``f(α, β) = L(θ + α·δ + β·η)``, with ``res`` points per axis over
    ``range``. δ, η are seeded Gaussian directions normalized per filter (``norm``: filter,
    layer or none) with biases and BN parameters left still (``ignore='biasbn'``), as Li et
    al.; or the ``directions`` given (one or two ``{name: tensor}`` dicts or flat vectors, used
    as they are), or ``directions='hessian'``: the top Hessian eigenvectors at θ, each scaled to the
    length a random direction has (``fastland.curvature``). ``bn_mode='eval'`` uses BN's running statistics; ``'batch'`` normalizes each
    batch of ``batch_size`` with its own statistics. Returns a ``Surface`` (``x``, ``y``,
    ``loss``, ``metrics``, ``directions``, ``path``); the caller's model is never changed.

    Under torchrun every rank calls this with the same arguments and gets the surface; the ranks
    share the grid (``fastland.distributed``). ``shard=True`` gives each rank only its slice of
    ``data`` (None: when the whole set does not fit a device).
    """
    data = distributed.shard_data(data, shard, batch_size, device)
    evalset, task, dev = prepare(model, data, loss_fn, device, batch_size)
    _check_choice(norm, dir_mod.NORMS, "norm")
    _check_choice(ignore, dir_mod.IGNORES, "ignore")
    space = FlatSpace(model)
    theta = space.flatten(model).to(dev)
    if directions is None:
        dirs = dir_mod.make(space, theta, dim, seed, norm, ignore)
        meta = {"direction": "random", "direction_seed": seed, "norm": norm, "ignore": ignore}
    elif isinstance(directions, str):
        if directions != "hessian":
            raise UserError(f"unknown directions {directions!r}; use 'hessian' (the top Hessian eigenvectors), None "
                            "(random) or give the directions")
        from fastland import curvature  # the top `dim` eigenvectors at θ, scaled like random directions (its docstring)

        if progress:
            print(f"directions: the top {dim} Hessian eigenvector(s) at the weights (bn_mode {bn_mode})", flush=True)
        dirs, meta = curvature.hessian_directions(model, evalset, loss_fn, dim=dim, norm=norm, ignore=ignore,
                                                  bn_mode=bn_mode, batch_size=batch_size, seed=seed, out=out,
                                                  overwrite=overwrite, progress=progress)
        dirs = dirs.to(dev)
    else:
        dirs = _given_directions(directions, space, dev)
        dim = dirs.shape[0]
        meta = {"direction": "given", "direction_seed": -1, "norm": "none", "ignore": "none"}
    meta |= dict(attrs or {})
    return _run(model, space, theta, dirs, evalset, task, dev, dim=dim, res=res, rng=range, bn_mode=bn_mode,
                out=out, precision=precision, batch_size=batch_size, engine=engine, strategy=strategy,
                overwrite=overwrite, progress=progress, chunk=chunk, attrs=meta, extras=extras)


def interpolate(start: nn.Module | Mapping[str, torch.Tensor], end: nn.Module | Mapping[str, torch.Tensor], data: Any,
                loss_fn: LossFn | str | None = None, *, model: nn.Module | None = None, res: int = 51,
                range: Sequence[float] = (-0.5, 1.5), bn_stats: str = "auto", bn_mode: str = "eval",  # noqa: A002
                out: str | Path | None = None, device: str | torch.device | None = None, precision: str = "auto",
                batch_size: int = 128, engine: str = "batched", strategy: str = "auto", overwrite: bool = False,
                progress: bool = True, attrs: Mapping[str, Any] | None = None, shard: bool | None = None) -> Surface:
    """The loss along the straight line from ``start`` to ``end`` (Goodfellow et al. 2015):
    ``f(α) = L(θ_start + α·(θ_end − θ_start))``; α = 0 is ``start``, α = 1 is ``end``.

    ``start``/``end`` are models or state dicts (then ``model`` gives the architecture).
    ``bn_stats``: ``interpolate`` moves BN's running statistics along the line too, so the
    curve ends exactly at ``end`` (Li et al.'s ``dir_type states``); ``start`` keeps the start
    model's statistics at every α; ``auto`` interpolates whenever BN uses running statistics.
    Under torchrun, see ``surface`` (``shard`` too).
    """
    _check_choice(bn_stats, BN_STATS, "bn_stats")
    m1 = _as_model(start, model, "start")
    m2 = _as_model(end, model if model is not None else m1, "end")
    s1, s2 = dict(m1.state_dict()), dict(m2.state_dict())
    if [(k, tuple(v.shape)) for k, v in s1.items()] != [(k, tuple(v.shape)) for k, v in s2.items()]:
        raise UserError("start and end are different architectures (their state_dict keys or shapes differ)")
    data = distributed.shard_data(data, shard, batch_size, device)
    evalset, task, dev = prepare(m1, data, loss_fn, device, batch_size)
    has_stats = bn_mode == "eval" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
                                          for m in m1.modules())
    use = ("interpolate" if has_stats else "start") if bn_stats == "auto" else bn_stats
    if not has_stats:
        use = "n/a"  # nothing to interpolate: no running statistics are used
    space = FlatSpace(m1, buffers=use == "interpolate")
    theta1 = space.flatten(m1).to(dev)
    dirs = dir_mod.interpolation(theta1, space.flatten(m2).to(dev)).unsqueeze(0)
    meta = {"direction": "interpolation", "direction_seed": -1, "norm": "none", "ignore": "none", "bn_stats": use,
            "interpolation_target_sha256": state_sha256(m2)} | dict(attrs or {})
    return _run(m1, space, theta1, dirs, evalset, task, dev, dim=1, res=res, rng=range, bn_mode=bn_mode, out=out,
                precision=precision, batch_size=batch_size, engine=engine, strategy=strategy, overwrite=overwrite,
                progress=progress, chunk=None, attrs=meta, extras=None)


def _as_model(obj: nn.Module | Mapping[str, torch.Tensor], arch: nn.Module | None, which: str) -> nn.Module:
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping):
        if arch is None:
            raise UserError(f"{which} is a state_dict: pass model= (an nn.Module of the same architecture) as well")
        import copy

        m = copy.deepcopy(arch)
        models.load_state(m, dict(obj), f"the {which} state_dict")
        return m
    raise UserError(f"{which} must be an nn.Module or a state_dict, not {type(obj).__name__}")


def _make_evaluator(engine: str, model: nn.Module, space: FlatSpace, theta: torch.Tensor, dirs: torch.Tensor,
                    evalset: data_mod.Data, task: Task, bn_mode: str, batch_size: int, precision: str, strategy: str,
                    progress: bool) -> Any:
    if engine == "reference":
        if precision not in ("auto", "fp32"):
            raise UserError(f"the reference engine computes in fp32 only; drop precision={precision} or use the batched engine")
        return ReferenceEvaluator(model, space, theta, dirs, evalset, task, bn_mode=bn_mode, batch_size=batch_size)
    from fastland.engine import BatchedEvaluator

    return BatchedEvaluator(model, space, theta, dirs, evalset, task, bn_mode=bn_mode, batch_size=batch_size,
                            precision=precision, strategy=strategy, verbose=progress)


def _run(model: nn.Module, space: FlatSpace, theta: torch.Tensor, dirs: torch.Tensor, evalset: data_mod.Data,
         task: Task, dev: torch.device, *, dim: int, res: int | Sequence[int], rng: Sequence[float], bn_mode: str,
         out: str | Path | None, precision: str, batch_size: int, engine: str, strategy: str, overwrite: bool,
         progress: bool, chunk: int | None, attrs: Mapping[str, Any], extras: Mapping[str, np.ndarray] | None) -> Surface:
    """Evaluate the grid (into a resumable file when ``out`` is given) and return the surface."""
    _check_choice(bn_mode, BN_MODES, "bn_mode")
    _check_choice(engine, ENGINES, "engine")
    _check_choice(precision, PRECISIONS, "precision")
    _check_choice(strategy, strategies.CHOICES, "strategy")
    if chunk is not None and chunk < 1:
        raise UserError(f"chunk must be at least 1, got {chunk}")
    if bn_mode == "batch" and evalset.cached and batch_size < 2:
        raise UserError("bn_mode batch needs batch_size of at least 2 (BN cannot normalize a batch of one)")
    if bn_mode == "batch" and evalset.cached and len(evalset) % batch_size == 1 and len(evalset) > 1:
        raise UserError(f"bn_mode batch: {len(evalset)} samples in batches of {batch_size} leave a last batch of one "
                        "sample, which BN cannot normalize; choose another batch size or sample count")
    x, y = _grid(dim, res, rng)
    nx, ny = len(x), (len(y) if y is not None else 1)
    files.check_memory(nx * ny * 41, f"a {nx}x{ny} grid", "use a smaller resolution")
    if engine == "batched" and evalset.cached:  # the engine keeps every prepared input on the device for the run
        x1 = evalset.sample(1)[0]
        files.check_memory(len(evalset) * x1[0].numel() * x1.element_size(),
                           f"the engine's prepared copy of {len(evalset):,} inputs", "use fewer samples", device=dev)
    precision_used = precision if engine == "batched" else "fp32"
    if engine == "batched":
        from fastland.engine import resolve_precision

        precision_used = resolve_precision(precision, dev)
    attrs = {
        "fastland_version": fastland.__version__, "model": type(model).__name__, "model_sha256": state_sha256(model),
        "checkpoint": "", "checkpoint_sha256": "", **evalset.attrs(), "loss": task.name, "dim": dim,
        "xmin": float(x[0]), "xmax": float(x[-1]), "nx": nx, "ymin": float(y[0]) if y is not None else 0.0,
        "ymax": float(y[-1]) if y is not None else 0.0, "ny": ny, "directions_sha256": _tensor_sha256(dirs),
        "interpolation_target_sha256": "", "bn_stats": "", "bn_mode": bn_mode,
        "bn_batch": (batch_size if evalset.cached else getattr(evalset, "batch_size", 0)) if bn_mode == "batch" else 0,
        "precision": precision_used, "engine": engine, "device": device_mod.describe(dev),
        "torch_version": str(torch.__version__), "parameters": space.numel,
        "direction_cosine": dir_mod.cosine(dirs[0], dirs[1]) if dim == 2 else 1.0,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    } | dict(attrs)
    shape = (nx,) if y is None else (ny, nx)
    dir_tensors = [{k: v.numpy() for k, v in space.unflatten_state(d).items()} for d in dirs]
    ctx = distributed.current()
    if ctx is not None:  # torchrun: the ranks pull chunks from a shared queue, rank 0 writes
        return distributed.run_surface(ctx, model, space, theta, dirs, evalset, task, dev, x, y, attrs, dir_tensors,
                                       out=out, precision=precision, batch_size=batch_size, engine=engine,
                                       strategy=strategy, overwrite=overwrite, progress=progress, chunk=chunk,
                                       extras=extras)
    lock, state, path = None, "memory", None
    if out is not None:
        path = Path(out)
        size = surfacefile.size_estimate(nx, ny, int(task.accuracy), space.numel, dirs.shape[0])
        size += sum(np.asarray(v).nbytes for v in (extras or {}).values())  # a trajectory's projected path
        files.check_output_file(path, 0 if path.exists() and not overwrite else size, "out")
        lock = files.WriteLock(path)
        lock.acquire()
    try:
        if path is not None:
            state, strategy = _check_existing(path, attrs, shape, task, overwrite, strategy, engine)
        evaluator = _make_evaluator(engine, model, space, theta, dirs, evalset, task, bn_mode, batch_size, precision,
                                    strategy, progress)
        attrs["strategy"] = getattr(evaluator, "strategy", engine)
        if state == "new":
            surfacefile.create(path, x, y, dir_tensors, attrs, accuracy=task.accuracy, extras=dict(extras or {}))
        sink = surfacefile.Writer(path) if path is not None else _MemorySink(shape, task.accuracy)
        pending, t_start = np.zeros(0, dtype=np.int64), time.perf_counter()
        try:
            pending = sink.pending()
            if progress:
                print(f"plan: {nx * ny:,} points ({nx}x{ny}), {len(pending):,} to evaluate"
                      f"{' (resuming)' if state == 'resume' else ''}; {evalset.describe()}; loss {task.name}; "
                      f"device {attrs['device']}; engine {engine} ({attrs['precision']}); bn_mode {bn_mode}"
                      f"{f'; out {path}' if path else ''}", flush=True)
            evaluate_points(evaluator, pending, x, y, sink, chunk or evaluator.chunk_size, progress)
        finally:
            elapsed = time.perf_counter() - t_start
            prior = float(sink.attrs().get("wall_time", 0.0))
            sink.finish({"wall_time": prior + elapsed, "last_run_seconds": elapsed, "last_run_points": int(len(pending)),
                         "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                         **distributed.run_record(sink.attrs(), {0: (int(len(pending)), elapsed)})})
    finally:
        if lock is not None:
            lock.release()
    if path is not None:
        return surfacefile.read(path, directions=True)
    assert isinstance(sink, _MemorySink)
    metrics = {"accuracy": sink.acc} if sink.acc is not None else {}
    surf = Surface(x, y, sink.loss, metrics, sink.done, attrs | sink.extra_attrs, None,
                   [space.unflatten_state(d) for d in dirs], dict(extras or {}))
    return surf


def _check_existing(path: Path, attrs: dict[str, Any], shape: tuple[int, ...], task: Task, overwrite: bool,
                    strategy: str, engine: str) -> tuple[str, str]:
    """``('new', strategy)`` for a file to create, ``('resume', strategy)`` for one to continue:
    its settings must match, and its strategy is kept (a run never mixes two methods)."""
    if not path.exists() or overwrite:
        return "new", strategy
    old = surfacefile.settings_of(path)
    diff = surfacefile.mismatches(old, attrs)
    if diff:
        raise UserError(f"{path} holds a surface with other settings ({diff[0]}"
                        f"{f' and {len(diff) - 1} more' if len(diff) > 1 else ''}); "
                        "pass --overwrite to replace it or choose another --out")
    surfacefile.check_structure(path, shape, attrs["split"], task.accuracy)
    kept = old.get("strategy")
    if engine == "batched" and kept in strategies.STRATEGIES:
        if strategy in strategies.STRATEGIES and strategy != kept:
            raise UserError(f"{path} was computed with the {kept} strategy; resume it with that one (or the default "
                            "auto), so that one file never mixes two methods")
        strategy = kept
    return "resume", strategy


class _MemorySink:
    """The surface in memory, when no file is written: the same protocol as ``surfacefile.Writer``."""

    def __init__(self, shape: tuple[int, ...], accuracy: bool) -> None:
        self.loss = np.full(shape, np.nan)
        self.acc = np.full(shape, np.nan) if accuracy else None
        self.done = np.zeros(shape, dtype=np.uint8)
        self.extra_attrs: dict[str, Any] = {}

    def pending(self) -> np.ndarray:
        return np.flatnonzero(self.done.reshape(-1) == 0)

    def write(self, idx: np.ndarray, loss: np.ndarray, acc: np.ndarray | None) -> None:
        self.loss.reshape(-1)[idx] = loss
        if self.acc is not None and acc is not None:
            self.acc.reshape(-1)[idx] = acc
        self.done.reshape(-1)[idx] = 1

    def attrs(self) -> dict[str, Any]:
        return self.extra_attrs

    def finish(self, attrs: dict[str, Any]) -> None:
        self.extra_attrs |= attrs


def grid_coords(idx: np.ndarray, x: np.ndarray, y: np.ndarray | None) -> torch.Tensor:
    """The coordinates ``[P, D]`` of flat (row-major) grid indices."""
    cols = [x[idx % len(x)]] if y is None else [x[idx % len(x)], y[idx // len(x)]]
    return torch.tensor(np.stack(cols, axis=1), dtype=torch.float32)


def evaluate_points(evaluator: Any, pending: np.ndarray, x: np.ndarray, y: np.ndarray | None, sink: Any, chunk: int,
                    progress: bool) -> float:
    """Evaluate the ``pending`` grid points chunk by chunk into ``sink``; returns the seconds taken."""
    t_start = time.perf_counter()
    bar = tqdm(total=len(pending), unit="pt", desc="surface", dynamic_ncols=True, file=sys.stderr,
               disable=not progress)
    try:
        for k, start in enumerate(range(0, len(pending), chunk)):
            idx = pending[start : start + chunk]
            t0 = time.perf_counter()
            loss, acc = evaluator.evaluate(grid_coords(idx, x, y))
            sink.write(idx, loss.double().cpu().numpy(), None if acc is None else acc.double().cpu().numpy())
            if k == 0 and len(pending) > len(idx) and progress:
                per_point = (time.perf_counter() - t0) / len(idx)
                bar.write(f"estimated time: {fmt_time(per_point * len(pending))} "
                          f"({1 / per_point:,.1f} points/s from the first chunk)")
            bar.update(len(idx))
    finally:
        bar.close()
    return time.perf_counter() - t_start


def fmt_time(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f}s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def load(path: str | Path) -> Surface:
    """Read a surface file written by fastland (its directions included)."""
    return surfacefile.read(path, directions=True)


# --- training ----------------------------------------------------------------------------
def train(model: nn.Module | str, data: Any, loss_fn: LossFn | str | None = None, *, out: str | Path,
          epochs: int = 20, lr: float = 0.01, batch: int = 128, optimizer: str = "adam", momentum: float = 0.0,
          weight_decay: float = 0.0, seed: int = 0, probe_every: int | None = 1, probe_steps: Sequence[float] | None = None,
          save_every: int = 0, samples: int | str = "all", device: str | torch.device | None = None,
          progress: bool = True) -> Path:
    """Train ``model`` on ``data`` into the run folder ``out`` with Santurkar et al.'s smoothness
    probes every ``probe_every`` steps (None: no probes); returns the path of ``final.pt``.

    ``model`` is an ``nn.Module`` (its weights are the starting point; it is not changed) or a
    model name (``"lenet_bn"``, ``"package.module:factory"``). ``data`` is what ``surface`` takes,
    or a name (``"synthetic"``, ``"imagefolder:PATH"``, ...). The folder gets ``epoch_XXX.pt``
    checkpoints (``epoch_000.pt`` the initial weights), ``step_XXXXXXX.pt`` every ``save_every``
    steps, ``metrics.csv`` with the probes, and ``final.pt``; calling again resumes.
    """
    from fastland import train as train_mod
    from fastland.probes import ProbeConfig

    dev = resolve_device(device)
    if isinstance(data, str):
        trainset = data_mod.load(data, "train", samples, seed=seed, device=dev)
        source = data
    else:
        trainset = data_mod.as_data(data, dev, batch_size=batch)
        source = trainset.source
    spec = model if isinstance(model, str) else f"custom:{type(model).__name__}"
    cfg = train_mod.TrainConfig(model=spec, data=source, samples=str(samples), epochs=epochs, lr=lr, batch=batch,
                                optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, seed=seed,
                                device=str(dev), save_every=save_every,
                                loss=loss_fn if isinstance(loss_fn, str) else "auto")
    probe = None
    if probe_every is not None:
        probe = ProbeConfig(every=probe_every, etas=tuple(probe_steps) if probe_steps is not None else None)
    given = None if isinstance(model, str) else model
    return train_mod.train(cfg, Path(out), probe, progress, trainset, model=given,
                           loss_fn=None if isinstance(loss_fn, str) else loss_fn)


# --- one point -----------------------------------------------------------------------------
def evaluate(model: nn.Module, data: Any, loss_fn: LossFn | str | None = None, *, bn_mode: str = "eval",
             batch_size: int = 500, device: str | torch.device | None = None) -> dict[str, float]:
    """The mean loss of ``model`` over ``data`` (and the accuracy in %, for classification), in eval mode
    (``bn_mode='batch'``: BN with each batch's statistics): the reference evaluator at the origin."""
    _check_choice(bn_mode, BN_MODES, "bn_mode")
    evalset, task, dev = prepare(model, data, loss_fn, device, batch_size)
    space = FlatSpace(model)
    theta = space.flatten(model).to(dev)
    ev = ReferenceEvaluator(model, space, theta, torch.zeros(1, space.numel, device=dev), evalset, task, bn_mode,
                            batch_size)
    loss, acc = ev.evaluate(torch.zeros(1, 1))
    out = {"loss": float(loss[0])}
    if acc is not None:
        out["accuracy"] = float(acc[0])
    return out
