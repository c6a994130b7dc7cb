"""Batch generation from a prompt file: items grouped by route (each expert set activated once per
run), batched, written atomically, recorded in `manifest.jsonl`, resumable, and split between
processes under `torchrun` / `accelerate launch`.

    result = run_batch("experts.yaml", "prompts.txt", "out/", GenerationOptions(batch_size=4, seed=1))
    result.written, result.skipped, result.failed, result.manifest

Layout of `out/`: one `<id>.png` per item (A1111 `parameters` + `mixdiff` chunks) and `manifest.jsonl`,
one line per image: id, index, line, prompt, negative, seed, steps, guidance, width, height,
scheduler, route, blend, path, sha256, seconds, base_seed, rank. Under several processes each rank
appends to `manifest.part<rank>.jsonl` and rank 0 merges the parts into `manifest.jsonl` at the end
(or the next run does, when a run was stopped).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixdiff_cli.catalog.model import Catalog
from mixdiff_cli.catalog.schema import load_catalog
from mixdiff_cli.core.errors import MixdiffError
from mixdiff_cli.core.fsutil import output_dir
from mixdiff_cli.catalog.headers import sha256_file as file_sha256
from mixdiff_cli.routing.route import check_known, parse_members
from mixdiff_cli.sampling.distributed import base_seed, distributed_state, gather, split_work
from mixdiff_cli.sampling.manifest import MANIFEST, Appender, BatchError, already_done, manifest_records, merge_manifest, params
from mixdiff_cli.sampling.options import GenerationOptions
from mixdiff_cli.sampling.prompts import PromptFileError, PromptItem, parse_prompts
from mixdiff_cli.sampling.regions import parse_regions
from mixdiff_cli.sampling.signals import Interrupted, Stop, stop_on_signals
from mixdiff_cli.sampling.work import Work, groups, plan, valid_items

if TYPE_CHECKING:
    from mixdiff_cli.routing.router import Router
    from mixdiff_cli.sampling.engine import Engine


@dataclass
class BatchResult:
    """What a batch run did. `exit_code`: 0 all written, 1 some failed, 128+N stopped by signal N."""

    out_dir: Path
    manifest: Path
    total: int = 0  # items in the prompt file (malformed ones included)
    written: int = 0
    skipped: int = 0  # already in the manifest with a verified file (--resume)
    failed: int = 0
    errors: list[str] = field(default_factory=list)  # one line per failed item
    interrupted: int | None = None  # the signal that stopped the run
    seconds: float = 0.0
    base_seed: int | None = None
    processes: int = 1
    rank: int = 0  # this process (print summaries on rank 0 only)
    groups: int = 0  # route groups this process ran

    @property
    def exit_code(self) -> int:
        if self.interrupted is not None:
            return 128 + self.interrupted
        return 1 if self.failed else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir), "manifest": str(self.manifest), "total": self.total,
            "written": self.written, "skipped": self.skipped, "failed": self.failed, "errors": self.errors,
            "interrupted": self.interrupted, "seconds": round(self.seconds, 3), "base_seed": self.base_seed,
            "processes": self.processes, "rank": self.rank, "exit_code": self.exit_code,
        }

@dataclass
class BatchSettings:
    """How a batch runs, beside its generation options."""

    resume: bool = False  # continue the batch already in the output folder
    keep_going: bool = False  # count bad items and failed chunks as failed instead of stopping
    exact: bool | None = None  # sample under `batch_invariant`; None: on CPU, not under torch.compile
    handle_signals: bool = True  # SIGINT/SIGTERM stop the run cleanly (main thread only)


@dataclass
class _Start:
    """What a run knows once its output folder, processes, manifest, seed, engine and work are set."""

    state: Any  # accelerate's PartialState, None in one process
    done: dict[str, dict[str, Any]]  # id -> manifest record
    seed: int
    engine: Engine
    work: list[Work]


def run_batch(
    catalog: Catalog | str | Path,
    prompts_file: str | Path,
    out_dir: str | Path,
    options: GenerationOptions | None = None,
    settings: BatchSettings | None = None,
    *,
    engine: Engine | None = None,
    router: Router | None = None,
    on_image: Callable[[dict[str, Any], int, int], None] | None = None,
) -> BatchResult:
    """Generate every item of `prompts_file` into `out_dir`; see the module docstring.

    Per-item values in the file override the run's `options` (negative ... scheduler; guidance, width
    and height None = the base pipeline's). `options.experts` fix the route of items that name none;
    otherwise the router decides with top_k/temperature/threshold. Seeds: the item's own, else
    `seed + index` (`seed` drawn once when None, or taken from the manifest on resume), so images do
    not depend on batch size, order or process count. Bad items raise `PromptFileError` naming their
    line before anything is written, or with `settings.keep_going` are counted as failed. See
    `BatchSettings.exact` (bit for bit on CPU, ~10% throughput on the tiny test model).
    `on_image(record, done, total)` is called after each image is written.
    """
    started = time.perf_counter()
    out_dir, settings = Path(out_dir), settings or BatchSettings()
    cat, opts, parsed, items, errors = read_inputs(catalog, prompts_file, options, settings)
    with claim_folder(out_dir):  # one batch at a time per folder: two would overwrite each other's images
        start = _start(cat, out_dir, items, opts, settings.resume, engine, router)
        state, engine = start.state, start.engine
        todo = [w for w in start.work if not already_done(out_dir, start.done.get(w.item.id), w, opts.blend)]
        ordered = [w for g in groups(todo) for w in g]  # by route; the same order on every process
        rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
        if rank == 0:
            _remove_stale(out_dir, [w.item for w in todo])
        if state is not None:
            state.wait_for_everyone()  # everyone has read the manifest before anyone appends to it

        result = BatchResult(
            out_dir=out_dir, manifest=out_dir / MANIFEST, total=len(parsed.items) + len(parsed.errors),
            skipped=len(start.work) - len(todo), failed=len(errors), errors=[str(e) for e in errors], base_seed=start.seed,
            processes=world, rank=rank,
        )
        mine = groups(split_work(ordered, state))
        result.groups = len(mine)
        part = MANIFEST if state is None else f"manifest.part{rank}.jsonl"
        exact = settings.exact
        if exact is None:
            exact = engine.device.type == "cpu" and not getattr(engine, "compile", False)
        run = _Run(opts.batch_size, opts.blend, start.seed, rank, settings.keep_going, exact, settings.handle_signals, parsed.path, on_image, opts)
        _execute(engine, mine, out_dir / part, result, run)
        result.seconds = time.perf_counter() - started
        if result.interrupted is None:  # else any per-process parts stay; the next --resume merges them
            _finish(state, result, len(errors), out_dir)
        return result


def _start(cat: Catalog, out_dir: Path, items: list[PromptItem], opts: GenerationOptions, resume: bool,
           engine: Engine | None, router: Router | None) -> _Start:
    """Prepare the output folder, read the manifest, fix the seed, build the engine, plan the work;
    a created folder is removed again (if still empty) when any of it fails."""
    with output_dir(out_dir):
        state = distributed_state(opts.device)
        done = manifest_records(out_dir)
        if done and not resume:
            raise BatchError(
                f"{out_dir} already holds a batch ({len(done)} images in {MANIFEST})",
                "pass --resume to continue it, or choose another --out",
            )
        seed = base_seed(opts.seed, done, state)
        engine = engine or _engine(cat, opts, state)
        return _Start(state, done, seed, engine, plan(items, opts, seed, engine, router))


def read_inputs(catalog: Catalog | str | Path, prompts_file: str | Path, options: GenerationOptions | None,
                settings: BatchSettings) -> tuple[Catalog, GenerationOptions, Any, list[PromptItem], list[PromptFileError]]:
    """The catalog, the checked options, the parsed prompt file, its good items and its bad ones; the first
    bad item raises unless `settings.keep_going`. Cheap (no torch): the CLI calls it before anything loads."""
    cat = catalog if isinstance(catalog, Catalog) else load_catalog(catalog)
    opts = (options or GenerationOptions()).check(len(cat.experts))
    check_known(opts.experts, cat.names)  # an unknown --expert fails before anything else
    parsed = parse_prompts(prompts_file)
    items, errors = valid_items(cat, parsed)
    if errors and not settings.keep_going:  # the one place that can offer --keep-going
        first = errors[0]
        hint = f"{first.hint}; or pass --keep-going to skip it" if first.hint else "pass --keep-going to skip it"
        raise PromptFileError(first.message, hint, line=first.line)
    return cat, opts, parsed, items, errors


@contextlib.contextmanager
def claim_folder(out_dir: Path) -> Iterator[None]:
    """Hold `out_dir` for this batch: a second batch started into it meanwhile fails at once, naming it. The
    lock is a file beside the folder (so that a folder the run creates can still be removed when empty);
    in a distributed run the first process holds it for all."""
    import os

    from filelock import FileLock, Timeout

    if os.environ.get("RANK", "0") != "0":
        yield
        return
    out_dir = out_dir.absolute()
    lock_file = out_dir.parent / f".{out_dir.name}.batch.lock"
    lock = FileLock(str(lock_file), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise BatchError(f"another batch is writing into {out_dir}", "wait for it to finish, or choose another --out") from None
    except OSError:  # the parent folder is not ours to write: go unguarded rather than refuse
        yield
        return
    try:
        yield
    finally:
        lock.release()
        lock_file.unlink(missing_ok=True)


def _engine(cat: Catalog, opts: GenerationOptions, state: Any) -> Engine:
    """The run's engine, on this process's accelerator (cuda:LOCAL_RANK) or the CPU under several processes."""
    from mixdiff_cli.sampling.engine import Engine

    device = opts.device
    if device is None and state is not None:
        device = "cpu" if state.device.type == "cpu" else str(state.device)
    return Engine.from_options(cat, opts, device=device)


def _remove_stale(out_dir: Path, items: list[PromptItem]) -> None:
    """Temporary files of images a killed run was writing (fsutil.atomic_path names)."""
    for item in items:
        for stale in out_dir.glob(f".{item.id}.png.*"):
            stale.unlink(missing_ok=True)


def _finish(state: Any, result: BatchResult, n_parse_errors: int, out_dir: Path) -> None:
    """Sum the processes' counts and merge the manifest parts (rank 0), then let every process return."""
    if state is None:
        merge_manifest(out_dir)
        return
    gather(state, result, n_parse_errors)
    if state.is_main_process:
        merge_manifest(out_dir)
    state.wait_for_everyone()  # every process returns after the merged manifest exists


@dataclass
class _Run:
    """How `_execute` runs and records each chunk."""

    batch_size: int
    blend: str | None
    base_seed: int
    rank: int
    keep_going: bool
    exact: bool
    handle_signals: bool
    source: Path
    on_image: Callable[[dict[str, Any], int, int], None] | None
    options: GenerationOptions | None = None  # routing options for the prompts of a canvas


def _execute(engine: Engine, groups: list[list[Work]], manifest_path: Path, result: BatchResult, run: _Run) -> None:
    """Sample each route group in batches, write every image and its manifest line; stop cleanly on a signal."""
    writer = Appender(manifest_path)
    try:
        with stop_on_signals(run.handle_signals) as stop:
            for group in groups:
                for start in range(0, len(group), run.batch_size):
                    if stop.signum is not None:
                        break
                    chunk = group[start : start + run.batch_size]
                    try:
                        if chunk[0].item.regions:
                            images, seconds = _sample_canvas(engine, chunk[0], run.options, stop, run.exact)
                        else:
                            images, seconds = _sample(engine, chunk, run.blend, stop, run.exact)
                    except Interrupted:
                        break
                    except MixdiffError as exc:
                        if not run.keep_going:
                            raise
                        result.failed += len(chunk)
                        result.errors += [f"{run.source}:{w.item.line}: {exc}" for w in chunk]
                        continue
                    for w, image in zip(chunk, images):  # images already made are written even after a signal
                        record = _write(manifest_path.parent, w, image, seconds / len(chunk), run.blend, run.base_seed, run.rank)
                        writer.write(record)
                        result.written += 1
                        if run.on_image is not None:
                            run.on_image(record, result.written + result.skipped, result.total)
            result.interrupted = stop.signum
    finally:
        writer.close()


def _sample(engine: Engine, chunk: list[Work], blend: str | None, stop: Stop, invariant: bool) -> tuple[list[Any], float]:
    """Images for one chunk (one route); abandons the chunk at the next step once a signal arrived."""

    def progress(step: int, total: int) -> None:
        if stop.signum is not None:
            raise Interrupted

    t0 = time.perf_counter()
    engine.ensure_loaded([name for name, _ in chunk[0].route.chosen])  # before patching: new LoRA layers get covered
    with engine.batch_invariant(invariant):
        images = engine.generate(
            [w.request for w in chunk], chunk[0].route, blend, route_info=chunk[0].info, progress=progress
        )
    return images, time.perf_counter() - t0


def _sample_canvas(engine: Engine, w: Work, opts: GenerationOptions | None, stop: Stop, invariant: bool) -> tuple[list[Any], float]:
    """The image of an item with `regions:` (its prompt, if any, the background), at the default canvas settings."""
    from mixdiff_cli.sampling.canvas import canvas_request, prepare_canvas, sample_canvas
    from mixdiff_cli.sampling.regions import CanvasOptions

    def progress(step: int) -> None:
        if stop.signum is not None:
            raise Interrupted

    t0 = time.perf_counter()
    opts = (opts or GenerationOptions()).updated(experts=parse_members(w.item.experts) or (opts.experts if opts else ()))
    run = prepare_canvas(engine, w.item.prompt or None, parse_regions(w.item.regions), canvas_request(engine, w.request), opts, CanvasOptions())
    with engine.batch_invariant(invariant):
        images = sample_canvas(run, [w.request.seed], progress)
    return images, time.perf_counter() - t0


def _write(out_dir: Path, w: Work, image: Any, seconds: float, blend: str | None, base_seed: int, rank: int) -> dict[str, Any]:
    """Write one image atomically and return its manifest record."""
    from mixdiff_cli.sampling.pngmeta import save_png

    name = f"{w.item.id}.png"
    meta = image.info.get("mixdiff")
    if meta is not None:  # the engine records one route per call; each image keeps its own decision
        meta = {**meta, "route": {**meta.get("route", {}), "source": w.info.source, "decision": w.info.decision}}
    path = save_png(image, out_dir / name, meta)
    return {
        "id": w.item.id,
        "index": w.item.index,
        "line": w.item.line,
        **params(w, blend),
        "guidance": (meta or {}).get("guidance", w.request.guidance),
        "width": image.width,
        "height": image.height,
        "path": name,
        "sha256": file_sha256(path),
        "seconds": round(seconds, 4),
        "base_seed": base_seed,
        "rank": rank,
    }
