"""Batch generation from a prompt file: items grouped by route (each expert set activated once per
run), batched, written atomically, recorded in `manifest.jsonl`, resumable, and split between
processes under `torchrun` / `accelerate launch`.

    result = run_batch("experts.yaml", "prompts.txt", "out/", batch_size=4, seed=1)
    result.written, result.skipped, result.failed, result.manifest

Layout of `out/`: one `<id>.png` per item (A1111 `parameters` + `mixdiff` chunks) and `manifest.jsonl`,
one line per image: id, index, line, prompt, negative, seed, steps, guidance, width, height,
scheduler, route, blend, path, sha256, seconds, base_seed, rank. Under several processes each rank
appends to `manifest.part<rank>.jsonl` and rank 0 merges the parts into `manifest.jsonl` at the end
(or the next run does, when a run was stopped).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixdiff_cli.catalog.model import Catalog
from mixdiff_cli.catalog.schema import load_catalog
from mixdiff_cli.core.errors import ExpertNotFound, MixdiffError, UsageError
from mixdiff_cli.catalog.headers import sha256_file as file_sha256
from mixdiff_cli.routing.route import catalog_bands, check_known, explicit_route, parse_members, spread_bands
from mixdiff_cli.sampling.options import DEFAULT_SCHEDULER, DEFAULT_STEPS, MAX_SEED, GenerationOptions
from mixdiff_cli.sampling.prompts import PromptFileError, PromptItem, parse_prompts
from mixdiff_cli.sampling.regions import check_regions, parse_regions

if TYPE_CHECKING:
    from mixdiff_cli.sampling.engine import Engine, Request
    from mixdiff_cli.routing.route import Route
    from mixdiff_cli.routing.router import Router

MANIFEST = "manifest.jsonl"
PART_GLOB = "manifest.part*.jsonl"
# What an image depends on: a manifest line whose values differ from the item's is not "done".
PARAM_KEYS = ("prompt", "negative", "seed", "steps", "scheduler", "route", "blend")
DEFAULTED_KEYS = ("guidance", "width", "height")  # None in a request: the engine's default, recorded as used


class BatchError(MixdiffError):
    """A batch that cannot start or continue (output folder, manifest)."""


class ManifestError(BatchError):
    """A manifest.jsonl that cannot be read."""


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
class _Work:
    """One item ready to run: its request and its route (with what the image metadata records of it)."""

    item: PromptItem
    request: Request
    route: Route
    info: Any  # engine.RouteInfo

    @property
    def key(self) -> tuple:
        """The route; an item with regions runs alone ('~' is outside the expert-name grammar)."""
        return self.route.key + ((("~regions", str(self.item.index)),) if self.item.regions else ())


# --- manifest -------------------------------------------------------------------------------------


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """The records of one manifest file. A torn last line (a killed writer) is ignored."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    records = []
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or not isinstance(record.get("id"), str):
                raise ValueError("not a record")
        except ValueError:
            if number == len(lines):  # no newline after it: the write was cut short
                continue
            raise ManifestError(f"{path}:{number} is not a manifest record", "delete that line (its image is regenerated on --resume)") from None
        records.append(record)
    return records


def manifest_records(out_dir: Path) -> dict[str, dict[str, Any]]:
    """id -> latest record over manifest.jsonl and the per-process parts (later lines win)."""
    latest: dict[str, dict[str, Any]] = {}
    for path in [out_dir / MANIFEST, *sorted(out_dir.glob(PART_GLOB))]:
        for record in read_manifest(path):
            latest[record["id"]] = record
    return latest


def merge_manifest(out_dir: str | Path) -> Path:
    """Fold the per-process parts into manifest.jsonl (one line per id, in item order), atomically."""
    from mixdiff_cli.core.fsutil import atomic_write

    out_dir = Path(out_dir)
    parts = sorted(out_dir.glob(PART_GLOB))
    main = out_dir / MANIFEST
    records = manifest_records(out_dir)
    lines = read_manifest(main)
    if parts or len(lines) != len(records) or (main.is_file() and not main.read_bytes().endswith(b"\n")):
        ordered = sorted(records.values(), key=lambda r: (r.get("index", 0), r["id"]))
        atomic_write(main, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
        for part in parts:
            part.unlink(missing_ok=True)
    return main


class _Appender:
    """Appends one JSON line per record with flush + fsync, after cutting off a torn last line."""

    def __init__(self, path: Path):
        self.path = path
        if path.is_file():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(path, "r+b") as fh:
                    fh.truncate(data.rfind(b"\n") + 1)
        self.fh = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()


def _verified(out_dir: Path, record: dict[str, Any]) -> bool:
    path = out_dir / str(record.get("path", ""))
    try:
        return path.is_file() and file_sha256(path) == record.get("sha256")
    except OSError:
        return False


# --- signals --------------------------------------------------------------------------------------


class _Stop:
    signum: int | None = None


class _Interrupted(Exception):
    """Raised from the engine's step callback to abandon the batch being sampled."""


@contextlib.contextmanager
def stop_on_signals(enabled: bool = True) -> Iterator[_Stop]:
    """SIGINT/SIGTERM set a flag the run checks between images and denoising steps; a second signal
    interrupts at once. Only in the main thread (elsewhere signals cannot be handled)."""
    stop = _Stop()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        if stop.signum is not None:
            raise KeyboardInterrupt
        stop.signum = signum

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# --- planning -------------------------------------------------------------------------------------


def _prepare_out(out_dir: Path) -> bool:
    """Create the output folder and prove it is writable, before any model loads. True if created."""
    from mixdiff_cli.core.fsutil import writable_dir

    created = not out_dir.exists()
    writable_dir(out_dir)
    return created


def _distributed_state(device: str | None) -> Any:
    """accelerate's PartialState when launched with several processes (torchrun / accelerate launch)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    from mixdiff_cli.core.runtime import pick_device

    return PartialState(cpu=pick_device(device).type == "cpu")  # a plain PartialState() under torchrun on CPU reports one process


def _split_work(todo: list[_Work], state: Any) -> list[_Work]:
    """This process's share: the work ordered by route group, cut in contiguous equal spans, so each
    process activates only the few expert sets its span crosses."""
    if state is None or state.num_processes == 1:
        return todo
    with state.split_between_processes(todo) as mine:
        return list(mine)


def _groups(work: list[_Work]) -> list[list[_Work]]:
    """Items under the same route (experts and weights), in item order; groups sharing an expert set
    are adjacent (sorted by expert names), so a set stays loaded across its groups."""
    out: dict[tuple, list[_Work]] = {}
    for w in work:
        out.setdefault(w.key, []).append(w)
    return sorted(out.values(), key=lambda g: (sorted(n for n, _ in g[0].route.chosen), g[0].key))


def _matches(record: dict[str, Any], w: _Work, blend: str | None) -> bool:
    want = _params(w, blend)
    if any(record.get(k) != want[k] for k in PARAM_KEYS):
        return False
    return all(getattr(w.request, k) is None or record.get(k) == getattr(w.request, k) for k in DEFAULTED_KEYS)


def _params(w: _Work, blend: str | None) -> dict[str, Any]:
    r = w.request
    return {
        "prompt": r.prompt, "negative": r.negative, "seed": r.seed, "steps": r.steps, "scheduler": r.scheduler, "route": [m.to_json() for m in w.route.members], "blend": blend,
    }


# --- the run --------------------------------------------------------------------------------------


def run_batch(
    catalog: Catalog | str | Path,
    prompts_file: str | Path,
    out_dir: str | Path,
    options: GenerationOptions | None = None,
    *,
    resume: bool = False,
    keep_going: bool = False,
    engine: Engine | None = None,
    router: Router | None = None,
    exact: bool | None = None,
    handle_signals: bool = True,
    on_image: Callable[[dict[str, Any], int, int], None] | None = None,
) -> BatchResult:
    """Generate every item of `prompts_file` into `out_dir`; see the module docstring.

    Per-item values in the file override the run's `options` (negative ... scheduler; guidance, width
    and height None = the base pipeline's). `options.experts` fix the route of items that name none;
    otherwise the router decides with top_k/temperature/threshold. Seeds: the item's own, else
    `seed + index` (`seed` drawn once when None, or taken from the manifest on resume), so images do
    not depend on batch size, order or process count. Bad items raise `PromptFileError` naming their
    line before anything is written, or with `keep_going` are counted as failed. `exact`: run under
    `batch_invariant` so that an image's bytes do not depend on its batch (None: on CPU, where it holds
    bit for bit and costs ~10% throughput on the tiny test model; not under torch.compile).
    `on_image(record, done, total)` is called after each image is written.
    """
    started = time.perf_counter()
    cat = catalog if isinstance(catalog, Catalog) else load_catalog(catalog)
    out_dir = Path(out_dir)
    opts = (options or GenerationOptions()).check(len(cat.experts))
    check_known(opts.experts, cat.names)  # an unknown --expert fails before anything else
    parsed = parse_prompts(prompts_file)
    items, errors = _valid_items(cat, parsed)
    if errors and not keep_going:
        raise errors[0]
    blend = opts.blend

    created = _prepare_out(out_dir)
    try:
        state = _distributed_state(opts.device)
        done = manifest_records(out_dir)
        if done and not resume:
            raise BatchError(
                f"{out_dir} already holds a batch ({len(done)} images in {MANIFEST})",
                "pass --resume to continue it, or choose another --out",
            )
        seed = _base_seed(opts.seed, done, state)
        if engine is None:
            from mixdiff_cli.sampling.engine import Engine

            device = opts.device
            if device is None and state is not None:  # this process's accelerator (cuda:LOCAL_RANK) or the CPU
                device = "cpu" if state.device.type == "cpu" else str(state.device)
            engine = Engine(cat, device=device, dtype=opts.dtype, max_loaded=opts.max_loaded, max_memory=opts.max_memory)
        work = _plan(items, opts, seed, engine, router)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # leave nothing behind when the run never started (only if still empty)
        raise

    todo = [w for w in work if not _already_done(out_dir, done.get(w.item.id), w, blend)]
    ordered = [w for g in _groups(todo) for w in g]  # by route; the same order on every process
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    if rank == 0:  # temporary files of images a killed run was writing (fsutil.atomic_path names)
        for w in todo:
            for stale in out_dir.glob(f".{w.item.id}.png.*"):
                stale.unlink(missing_ok=True)
    if state is not None:
        state.wait_for_everyone()  # everyone has read the manifest before anyone appends to it

    result = BatchResult(
        out_dir=out_dir, manifest=out_dir / MANIFEST, total=len(parsed.items) + len(parsed.errors),
        skipped=len(work) - len(todo), failed=len(errors), errors=[str(e) for e in errors], base_seed=seed,
        processes=world, rank=rank,
    )
    mine = _groups(_split_work(ordered, state))
    result.groups = len(mine)
    part = MANIFEST if state is None else f"manifest.part{rank}.jsonl"
    if exact is None:
        exact = engine.device.type == "cpu" and not getattr(engine, "compile", False)
    _execute(engine, mine, out_dir / part, result, _Run(opts.batch_size, blend, seed, rank, keep_going, exact, handle_signals, parsed.path, on_image, opts))
    result.seconds = time.perf_counter() - started
    if result.interrupted is not None:
        return result  # any per-process parts stay; the next --resume merges them
    if state is not None:
        _gather(state, result, len(errors))
        if state.is_main_process:
            merge_manifest(out_dir)
        state.wait_for_everyone()  # every process returns after the merged manifest exists
    else:
        merge_manifest(out_dir)
    return result


def _valid_items(cat: Catalog, parsed: Any) -> tuple[list[PromptItem], list[PromptFileError]]:
    """The parsed items whose experts exist, and one error per bad item (in line order)."""
    errors: list[PromptFileError] = list(parsed.errors)
    items: list[PromptItem] = []
    for item in parsed.items:
        try:
            check_known(parse_members(item.experts), cat.names)
            check_regions(parse_regions(item.regions), cat.names)
        except (ExpertNotFound, UsageError) as exc:
            errors.append(PromptFileError(f"{parsed.path}:{item.line}: {exc.message}", f"{exc.hint}; or pass --keep-going to skip it", line=item.line))
        else:
            items.append(item)
    errors.sort(key=lambda e: e.line or 0)
    return items, errors


def _base_seed(seed: int | None, done: dict[str, dict[str, Any]], state: Any) -> int:
    """The run's seed: given, else the one a resumed manifest recorded, else drawn (rank 0's draw)."""
    if seed is not None:
        return seed
    recorded = next((r["base_seed"] for r in done.values() if isinstance(r.get("base_seed"), int)), None)
    if recorded is not None:
        return recorded
    seed = random.randint(0, MAX_SEED)
    if state is not None:
        from accelerate.utils import broadcast_object_list

        seed = broadcast_object_list([seed])[0]
    return seed


def _plan(items: list[PromptItem], opts: GenerationOptions, seed: int, engine: Engine, router: Router | None) -> list[_Work]:
    """Each item's request and route: its --expert overrides, else the router (one encoder pass for all)."""
    from mixdiff_cli.sampling.engine import Request, RouteInfo

    cat = engine.catalog
    routes: dict[int, Any] = {}
    need_router = [it for it in items if not (it.experts or opts.experts or it.regions)]  # a canvas routes its own prompts
    if need_router and cat.experts:
        if router is None:
            from mixdiff_cli.routing.router import load_router

            router = load_router(cat, opts.encoder, pipe=engine.pipe, device=str(engine.device), on_stale=opts.on_stale)
        vecs = router.embed([it.prompt for it in need_router])
        for it, vec in zip(need_router, vecs):
            route = router.decide(vec, it.prompt, top_k=opts.top_k, temperature=opts.temperature, threshold=opts.threshold)
            if opts.bands == "auto":
                route = spread_bands(route, catalog_bands(cat))
            routes[it.index] = (route, RouteInfo(source="router", decision=route.to_dict()))
    work = []
    for it in items:
        if it.index not in routes:  # overrides, or a catalog without experts (the bare base)
            route = explicit_route(parse_members(it.experts) or opts.experts, it.prompt)
            routes[it.index] = (route, RouteInfo(source="explicit", decision=route.to_dict()))
        request = Request(
            prompt=it.prompt,
            negative=it.negative if it.negative is not None else opts.negative,
            seed=it.seed if it.seed is not None else (seed + it.index) % (MAX_SEED + 1),
            steps=it.steps or opts.steps or DEFAULT_STEPS,
            guidance=it.guidance if it.guidance is not None else opts.guidance,
            width=it.width or opts.width,
            height=it.height or opts.height,
            scheduler=it.scheduler or opts.scheduler or DEFAULT_SCHEDULER,
        )
        work.append(_Work(it, request, *routes[it.index]))
    return work


def _already_done(out_dir: Path, record: dict[str, Any] | None, w: _Work, blend: str | None) -> bool:
    """In the manifest with the same settings, and its file verifies (sha256)."""
    return record is not None and _matches(record, w, blend) and _verified(out_dir, record)


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


def _execute(engine: Engine, groups: list[list[_Work]], manifest_path: Path, result: BatchResult, run: _Run) -> None:
    """Sample each route group in batches, write every image and its manifest line; stop cleanly on a signal."""
    writer = _Appender(manifest_path)
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
                    except _Interrupted:
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


def _gather(state: Any, result: BatchResult, n_parse_errors: int) -> None:
    """Every process's counts and errors, summed into `result` (on every process)."""
    from accelerate.utils import gather_object

    state.wait_for_everyone()
    mine = (result.written, result.failed - n_parse_errors, result.errors[n_parse_errors:])
    counts = gather_object([mine])
    result.written = sum(c[0] for c in counts)
    result.failed = n_parse_errors + sum(c[1] for c in counts)
    result.errors = result.errors[:n_parse_errors] + [e for c in counts for e in c[2]]


def _sample(engine: Engine, chunk: list[_Work], blend: str | None, stop: _Stop, invariant: bool) -> tuple[list[Any], float]:
    """Images for one chunk (one route); abandons the chunk at the next step once a signal arrived."""

    def progress(step: int, total: int) -> None:
        if stop.signum is not None:
            raise _Interrupted

    t0 = time.perf_counter()
    engine.ensure_loaded([name for name, _ in chunk[0].route.chosen])  # before patching: new LoRA layers get covered
    with engine.batch_invariant(invariant):
        images = engine.generate(
            [w.request for w in chunk], chunk[0].route, blend, route_info=chunk[0].info, progress=progress
        )
    return images, time.perf_counter() - t0


def _sample_canvas(engine: Engine, w: _Work, opts: GenerationOptions | None, stop: _Stop, invariant: bool) -> tuple[list[Any], float]:
    """The image of an item with `regions:` (its prompt, if any, the background), at the default canvas settings."""
    from mixdiff_cli.sampling.canvas import canvas_request, prepare_canvas, sample_canvas
    from mixdiff_cli.sampling.regions import CanvasOptions

    def progress(step: int) -> None:
        if stop.signum is not None:
            raise _Interrupted

    t0 = time.perf_counter()
    opts = (opts or GenerationOptions()).updated(experts=parse_members(w.item.experts) or (opts.experts if opts else ()))
    run = prepare_canvas(engine, w.item.prompt or None, parse_regions(w.item.regions), canvas_request(engine, w.request), opts, CanvasOptions())
    with engine.batch_invariant(invariant):
        images = sample_canvas(run, [w.request.seed], progress)
    return images, time.perf_counter() - t0


def _write(out_dir: Path, w: _Work, image: Any, seconds: float, blend: str | None, base_seed: int, rank: int) -> dict[str, Any]:
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
        **_params(w, blend),
        "guidance": (meta or {}).get("guidance", w.request.guidance),
        "width": image.width,
        "height": image.height,
        "path": name,
        "sha256": file_sha256(path),
        "seconds": round(seconds, 4),
        "base_seed": base_seed,
        "rank": rank,
    }
