"""The embedded demo, measured: the bare base, the routed mixture and the oracle expert, side by side.

    python benchmarks/eval_demo.py                                # the packaged demo, 2 x 256 held-out prompts
    python benchmarks/eval_demo.py --per-domain 8 --steps 10      # a quick look

Held-out prompts are new images of every domain (seeds no training image used) captioned in wording
no training caption uses (`mixdiff_cli.demo.data`), in two sets:

- "rephrased": held-out sentence templates (new phrasings and word orders) over the training vocabulary;
- "heldout": the same templates, and for each attribute an unseen synonym half of the time
  ("crimson", "gingham", "pasture"), words the demo's text encoder never saw in training.

For each prompt it measures:
- routing: does the catalog's router send the prompt to its domain's expert (top-1, top-2)?
- held-out denoising loss: the same (image, noise, timestep) triples through the bare base, the
  routed mixture (each triple under its own prompt's route) and the domain's own expert (oracle);
- attribute accuracy: the image generated from the prompt (same seed in every column, `mixdiff
  generate`'s defaults: 30 DDIM steps, the pipeline's guidance, top-1) read back by the domain's
  checker, the fraction of the prompt's attributes drawn right.

Prints one table per set and the targets of the demo issue; writes report.json, report.md and a
contact sheet (one prompt per domain, base / routed / oracle) into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HELDOUT_SEED = 7000  # training images used seeds 0-3 (scripts/build_demo); these are new draws
COLUMNS = ("base", "routed", "oracle")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--catalog", type=Path, default=None, help="default: the packaged demo catalog")
    ap.add_argument("--router", type=Path, default=None, help="evaluate this router checkpoint instead of the catalog's")
    ap.add_argument("--splits", default="rephrased,heldout", help="prompt sets (default: rephrased,heldout)")
    ap.add_argument("--per-domain", type=int, default=64, help="held-out prompts per domain and set (default 64: 256 per set)")
    ap.add_argument("--evals", type=int, default=4, help="(noise, timestep) draws per held-out image for the loss")
    ap.add_argument("--steps", type=int, default=30, help="denoising steps (default 30, as mixdiff generate)")
    ap.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's, as mixdiff generate)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "eval-demo")
    return ap.parse_args()


def mean(values) -> float:
    values = list(values)
    return math.fsum(values) / len(values) if values else float("nan")


def evaluate_split(engine, router, split: str, args: argparse.Namespace, out: Path) -> tuple[dict, dict]:
    """One prompt set: per-domain and overall numbers, and the images (column -> list) for the sheet."""
    from mixdiff_cli.training.dataset import scan_dataset
    from mixdiff_cli.demo import data, measure
    from mixdiff_cli.sampling.engine import Request
    from mixdiff_cli.evaluation.heldout import HeldoutLoss

    domains = [d for d in data.DOMAINS if d in engine.catalog.names]
    items = []  # (domain, caption, attrs)
    folders = {}
    for i, d in enumerate(domains):
        folders[d] = data.write_dataset(d, out / split / d, args.per_domain, seed=HELDOUT_SEED + i, split=split)
        for line in (folders[d] / "attrs.jsonl").read_text().splitlines():
            row = json.loads(line)
            items.append((d, row["caption"], {k: v for k, v in row.items() if k not in ("file", "caption")}))
    texts = [c for _, c, _ in items]

    # routing
    routes2 = router.route(texts, top_k=2)
    route_of = [r.chosen[0][0] if r.chosen else None for r in router.route(texts, top_k=1)]
    per: dict[str, dict] = {d: {} for d in domains}
    for d in domains:
        idx = [j for j, it in enumerate(items) if it[0] == d]
        per[d]["routing"] = {
            "top1": mean(route_of[j] == d for j in idx),
            "top2": mean(d in [e for e, _ in routes2[j].chosen] for j in idx),
            "routed_to": {str(e): sum(route_of[j] == e for j in idx) for e in {route_of[j] for j in idx}},
        }

    # held-out denoising loss: base, each triple under its own prompt's route, the domain's expert
    for d in domains:
        records = scan_dataset(folders[d]).records  # sorted by file name, as write_dataset numbers them: record k = row k
        heldout = HeldoutLoss(engine, records, args.evals * len(records))
        first = next(j for j, it in enumerate(items) if it[0] == d)
        route = [route_of[first + k] for k in range(len(records))]
        losses = {m: heldout.losses([] if m is None else [m], args.batch_size) for m in sorted({None, d, *route}, key=str)}
        per[d]["loss"] = {
            "base": mean(losses[None]),
            "routed": mean(losses[route[r]][t] for t, r in enumerate(heldout.rows)),
            "oracle": mean(losses[d]),
        }

    # attribute accuracy of generated images (seed = prompt index, the same in every column)
    requests = [Request(c, seed=j, steps=args.steps, guidance=args.guidance) for j, c in enumerate(texts)]
    encoded = engine.encode(texts)
    images: dict[str, list] = {c: [None] * len(items) for c in COLUMNS}

    def render(column: str, idx: list[int], experts: list[str]) -> None:
        for start in range(0, len(idx), args.batch_size):
            chunk = idx[start : start + args.batch_size]
            got = engine.generate([requests[j] for j in chunk], [(e, 1.0) for e in experts], "noise", encoded=encoded.take(chunk))
            for j, image in zip(chunk, got):
                images[column][j] = image

    render("base", list(range(len(items))), [])
    for expert in sorted(set(route_of), key=str):
        render("routed", [j for j, e in enumerate(route_of) if e == expert], [] if expert is None else [expert])
    for d in domains:
        render("oracle", [j for j, it in enumerate(items) if it[0] == d], [d])
    for d in domains:
        idx = [j for j, it in enumerate(items) if it[0] == d]
        per[d]["attributes"], per[d]["all_right"], per[d]["by_attribute"] = {}, {}, {}
        for c in COLUMNS:
            verdicts = [measure.check(d, images[c][j], items[j][2]) for j in idx]
            per[d]["attributes"][c] = mean(mean(v.values()) for v in verdicts)
            per[d]["all_right"][c] = mean(all(v.values()) for v in verdicts)
            per[d]["by_attribute"][c] = {a: mean(v[a] for v in verdicts) for a in verdicts[0]}

    overall = {
        "routing": {"top1": mean(route_of[j] == it[0] for j, it in enumerate(items)),
                    "top2": mean(it[0] in [e for e, _ in routes2[j].chosen] for j, it in enumerate(items))},
        **{key: {c: mean(per[d][key][c] for d in domains) for c in COLUMNS} for key in ("loss", "attributes", "all_right")},
    }
    targets = {
        "routing top-1 >= 95%": overall["routing"]["top1"] >= 0.95,
        "routed loss < base loss on every domain": all(per[d]["loss"]["routed"] < per[d]["loss"]["base"] for d in domains),
        "routed attribute accuracy >= base + 15 points": overall["attributes"]["routed"] >= overall["attributes"]["base"] + 0.15,
    }
    picks = [next(j for j, it in enumerate(items) if it[0] == d) for d in domains]
    sheet = {"rows": [f"{texts[j]} (routed: {route_of[j]})" for j in picks], "images": [[images[c][j] for c in COLUMNS] for j in picks]}
    return {"prompts": len(items), "domains": per, "overall": overall, "targets": targets}, sheet


def main() -> int:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from mixdiff_cli.catalog.discovery import packaged_catalog_path
    from mixdiff_cli.catalog.schema import load_catalog
    from mixdiff_cli.sampling.engine import Engine
    from mixdiff_cli.evaluation.figures import contact_sheet
    from mixdiff_cli.core.quiet import quiet_frameworks
    from mixdiff_cli.routing.router import load_router

    t0 = time.perf_counter()
    cat = load_catalog(args.catalog or packaged_catalog_path())
    if args.router is not None:
        cat.router = str(args.router.resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    with quiet_frameworks():
        engine = Engine(cat, dtype="float32")
        router = load_router(cat, pipe=engine.pipe)
    report = {
        "catalog": str(cat.path), "catalog_hash": cat.hash(), "router": router.info(),
        "settings": {"per_domain": args.per_domain, "evals_per_image": args.evals, "steps": args.steps,
                     "guidance": args.guidance if args.guidance is not None else "pipeline default", "scheduler": "ddim",
                     "top_k": 1, "seeds": "prompt index", "heldout_seed": HELDOUT_SEED, "threads": args.threads},
        "splits": {},
    }
    sheet_rows, sheet_images = [], []
    text = []
    for split in args.splits.split(","):
        with quiet_frameworks():
            result, sheet = evaluate_split(engine, router, split, args, args.out)
        report["splits"][split] = result
        sheet_rows += [f"[{split}] {r}" for r in sheet["rows"]]
        sheet_images += sheet["images"]
        text.append(markdown(split, result, report["settings"]))
        print(text[-1], flush=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (args.out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.out / "report.md").write_text("\n".join(text))
    contact_sheet(sheet_images, sheet_rows, list(COLUMNS), cell=128,
                  title=f"Demo, held-out prompts: {args.steps} DDIM steps, seed = prompt index").save(args.out / "contact_sheet.png")
    print(f"wrote {args.out}/report.json, report.md, contact_sheet.png in {report['seconds']:.0f} s")
    return 0


def markdown(split: str, result: dict, settings: dict) -> str:
    per, overall = result["domains"], result["overall"]
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    lines = [
        f"### {split}: {result['prompts']} prompts ({settings['per_domain']} per domain)",
        "",
        "| domain | routing top-1 | top-2 | loss: base | routed | oracle | attributes: base | routed | oracle |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d in [*per, "overall"]:
        p = overall if d == "overall" else per[d]
        lines.append(
            f"| {d} | {pct(p['routing']['top1'])} | {pct(p['routing']['top2'])} | "
            + " | ".join(f"{p['loss'][c]:.4f}" for c in COLUMNS) + " | "
            + " | ".join(pct(p["attributes"][c]) for c in COLUMNS) + " |"
        )
    lines += ["", *[f"- {name}: {'met' if ok else 'MISSED'}" for name, ok in result["targets"].items()], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
