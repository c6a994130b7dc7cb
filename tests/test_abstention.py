"""A router that knows what it does not know: abstention by default, calibrated confidence, the floor
under top-k members, and how `route`, `generate` and `evaluate routing` show them.

Fixtures: the synthetic four-domain catalog of test_router_train (words encoder, held-out captions in
other templates), prompts outside every domain written here (none is a generic caption the router
trained on), and the tiny SD pipeline for images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mixdiff_cli.cli import app
from mixdiff_cli.routing import router as R
from mixdiff_cli.routing.calibrate import fit_platt, fit_temperature, fit_threshold
from mixdiff_cli.routing.checkpoint import read_checkpoint
from mixdiff_cli.routing.generic import generic_captions, negatives, noisy
from mixdiff_cli.routing.train import TrainConfig, train_router
from test_router_train import captions, make_catalog

DOMAINS = ["animals", "shapes", "landscapes", "city"]
# none of these is about an animal, a shape, a landscape or a city, and none is a generic caption
OUTSIDE = [
    "a bowl of miso soup", "a basket of croissants", "a tray of dumplings", "a jar of honey", "a saxophone player in a jazz club",
    "a violin on sheet music", "a laptop covered in stickers", "a tennis racket", "a basketball hoop", "a chess knight",
    "a knitted wool sweater", "a stack of old books", "a steaming teapot", "a submarine in the deep", "a microscope in a laboratory",
    "a birthday cake with candles", "a pirate with an eye patch", "a samurai sword on a stand", "a ballerina on stage",
    "a grandfather reading a newspaper", "a firefighter holding a hose", "a surgeon in scrubs", "a wedding dress",
    "a pair of headphones", "a vending machine", "an umbrella", "a toolbox full of wrenches", "a spinning top toy",
    "a pot of stew", "zqxv brtk", "",
]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    path = make_catalog(tmp_path_factory.mktemp("abstain"), DOMAINS, Path("/nonexistent/base"))
    train_router(path, config=TrainConfig(encoder="words"))
    return path


def held_out() -> list[tuple[str, str]]:
    return [(p, d) for d in DOMAINS for p in captions(d, 60, "heldout")]


def rates(router: R.Router) -> tuple[float, float, float]:
    """(in-world prompts routed to their expert, in-world prompts abstained, outside prompts abstained)."""
    held = held_out()
    routes = router.route([p for p, _ in held])
    right = sum(bool(r.chosen) and r.chosen[0][0] == d for r, (_, d) in zip(routes, held)) / len(held)
    abstained = sum(not r.chosen for r in routes) / len(held)
    outside = sum(not r.chosen for r in router.route(OUTSIDE)) / len(OUTSIDE)
    return right, abstained, outside


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = 5) -> float:
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (confidence > lo) & (confidence <= hi)
        if m.any():
            total += m.mean() * abs(confidence[m].mean() - correct[m].mean())
    return float(total)


def test_outside_prompts_are_not_generic_captions():
    assert not (set(OUTSIDE) - {""}) & set(generic_captions())  # the empty prompt is one, on purpose
    assert len(generic_captions()) == 480 and "" in generic_captions() and generic_captions() == generic_captions()


# --- abstention ------------------------------------------------------------------------------------


def test_trained_router_abstains_outside_and_keeps_the_world(trained, capsys):
    router = R.load_router(trained)
    right, abstained, outside = rates(router)
    with capsys.disabled():
        print(f"\n[abstain] trained: in-world right {right:.3f}, abstained {abstained:.3f}; outside abstained {outside:.3f}; "
              f"fit threshold {router.fit_threshold}, temperature {router.temperature}")
    assert outside >= 0.85 and right >= 0.93 and abstained <= 0.03
    # --no-abstain (and the old explicit threshold 0) always choose
    assert all(r.chosen for r in router.route(OUTSIDE, abstain=False))
    assert all(r.chosen for r in router.route(OUTSIDE, threshold=0.0))
    # the checkpoint keeps what calibration fitted
    gate = read_checkpoint(trained.parent / "router.safetensors").gate
    assert gate.none_weight is not None and round(gate.fit_threshold, 4) == router.fit_threshold and 0 < gate.fit_threshold < 1
    assert round(gate.temperature, 4) == router.temperature != 1.0 and gate.fit_platt != (1.0, 0.0)


def test_an_old_checkpoint_without_a_none_row_never_abstains(tmp_path):
    path = make_catalog(tmp_path, DOMAINS, Path("/nonexistent/base"), n_prompts=20)
    train_router(path, config=TrainConfig(encoder="words", abstain=False, epochs=40))
    router = R.load_router(path)
    assert router.fit_threshold is None and router.gate.none_weight is None
    routes = router.route(OUTSIDE)
    assert all(r.chosen for r in routes) and all(r.abstention is None for r in routes)


def test_prototype_routing_abstains_the_same_way(tmp_path, capsys):
    path = make_catalog(tmp_path, DOMAINS, Path("/nonexistent/base"))
    router = R.load_router(path, encoder="words")
    assert router.kind == "prototypes" and router.fit_threshold is not None
    right, abstained, outside = rates(router)
    with capsys.disabled():
        print(f"\n[abstain] prototypes: in-world right {right:.3f}, abstained {abstained:.3f}; outside abstained {outside:.3f}")
    assert outside >= 0.85 and right >= 0.80 and abstained <= 0.20
    # the calibration is part of the cache: a warm load abstains alike without embedding a caption
    again = R.load_router(path, encoder="words")
    assert again.fit_threshold == router.fit_threshold
    assert [r.chosen for r in again.route(OUTSIDE)] == [r.chosen for r in router.route(OUTSIDE)]


def test_a_trigger_word_still_forces_its_expert(tmp_path):
    path = make_catalog(tmp_path, ["animals", "shapes"], Path("/nonexistent/base"), n_prompts=20)
    from mixdiff_cli.catalog.schema import edit_catalog

    with edit_catalog(path) as cat:
        cat.experts[0].trigger = ["zoofy"]
    route = R.load_router(path, encoder="words").route(["a bowl of miso soup, zoofy"])[0]
    assert route.chosen == [("animals", 1.0)] and route.abstention["abstained"] is False
    assert route.abstention["reason"].startswith("a trigger word chose")


# --- calibration -----------------------------------------------------------------------------------


def test_held_out_probabilities_are_calibrated(trained, capsys):
    router = R.load_router(trained)
    held = held_out()
    vecs = router.embed([p for p, _ in held])
    labels = np.array([router.names.index(d) for _, d in held])
    ece_at = {}
    for t in (1.0, 1 / router.temperature, 5.0):  # as routed; the gate's own logits (T = 1); five times softer
        probs = router.probabilities(vecs, temperature=t).numpy()
        ece_at[t] = ece(probs.max(1), probs.argmax(1) == labels)
    with capsys.disabled():
        print(f"\n[calibration] held-out ECE at the fitted T={router.temperature}: {ece_at[1.0]:.3f}; at T=1: "
              f"{ece_at[1 / router.temperature]:.3f}; five times softer: {ece_at[5.0]:.3f}")
    assert ece_at[1.0] <= 0.05 and ece_at[5.0] > 0.05  # the measure tells an underconfident router apart


def test_calibration_functions_on_known_data():
    import torch

    # logits whose right answer is right 75% of the time at p = 0.98 (T = 1): the fitted T softens them
    logits = torch.tensor([[4.0, 0.0]] * 100)
    labels = torch.tensor([0] * 75 + [1] * 25)
    t = fit_temperature(logits, labels)
    assert math.isclose(torch.softmax(logits[0] / t, -1)[0].item(), 0.75, abs_tol=0.01)
    # a threshold between two separated populations keeps all of one and abstains all of the other
    assert 0.3 < fit_threshold(np.array([0.8, 0.9, 0.95]), np.array([0.1, 0.2, 0.3])) < 0.8
    assert fit_threshold(np.array([0.8]), np.array([])) is None
    # Platt scaling orders as the margin does, and maps the boundary between the two kinds near 0.5
    a, b = fit_platt(np.array([2.0, 3.0, 4.0, 1.0]), np.array([-2.0, -3.0, -1.0, 0.5]))
    assert a > 0 and 1 / (1 + math.exp(-(a * 0.75 + b))) == pytest.approx(0.5, abs=0.2)


def test_generic_negatives_drop_captions_an_expert_owns():
    import torch

    from mixdiff_cli.routing.encoders import WordsEncoder

    enc = WordsEncoder()
    experts = ["a tabby cat on a sofa", "a cat sleeping", "a tabby cat in the sun", "a red circle", "a blue circle", "a green circle"]
    owner = torch.tensor([0, 0, 0, 1, 1, 1])
    generic = ["a photo of a tabby cat", "a bowl of noodles", "a wooden cabin in the fog"]
    keep = negatives(enc(experts), owner, enc(generic)).tolist()
    assert keep == [False, True, True]
    assert noisy(["a red circle on white"], seed=1) == noisy(["a red circle on white"], seed=1) != ["a red circle on white"]
    assert set("a red circle on white".split()) <= set(noisy(["a red circle on white"], seed=1, replace=0.0)[0].split())


# --- the floor ---------------------------------------------------------------------------------------


def test_top_k_leaves_out_members_under_the_floor(trained):
    router = R.load_router(trained)
    route = router.route(["a big cat photo"], top_k=3)[0]
    top = max(route.probs.values())
    assert len(route.chosen) == 1 and route.chosen[0][0] == "animals"
    dropped = [n for n, why in route.reasons.items() if why.startswith("left out (weight")]
    assert dropped and all(route.probs[n] < R.FLOOR * top for n in dropped)
    # a member at or above the floor stays: softer probabilities keep more than one
    soft = router.route(["a cat in the city street"], top_k=2, temperature=3.0)[0]
    assert len(soft.chosen) == 2 and min(w for _, w in soft.chosen) >= R.FLOOR * max(w for _, w in soft.chosen)


# --- what the commands show -------------------------------------------------------------------------


def test_route_explains_abstentions_and_dropped_members_in_one_line_each(trained):
    res = invoke("route", "a bowl of miso soup", "a big cat photo", "-k", "3", "--catalog", str(trained))
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    why = [ln for ln in lines if ln.startswith("abstained: ")]
    assert len(why) == 1 and "below" in why[0] and why[0].endswith(": bare base")
    assert "-> none: the bare base" in res.output
    dropped = [ln for ln in lines if "left out (weight" in ln and "< floor 0.05 x top" in ln and not ln.startswith("│")]
    assert len(dropped) == 2  # the two experts under the floor of "a big cat photo", one line each
    data = json.loads(invoke("route", "a bowl of miso soup", "a big cat photo", "--catalog", str(trained), "--json").stdout)
    ab = data[0]["abstention"]
    assert data[0]["chosen"] == [] and ab["abstained"] is True and ab["score"] < ab["threshold"] and ab["reason"].startswith("nearest expert ")
    assert set(ab) >= {"score", "threshold", "reason", "nearest"} and data[1]["abstention"]["abstained"] is False
    forced = json.loads(invoke("route", "a bowl of miso soup", "--no-abstain", "--catalog", str(trained), "--json").stdout)
    assert forced[0]["chosen"] and forced[0]["options"]["abstain"] is False and "abstention" not in forced[0]
    explicit = json.loads(invoke("route", "a bowl of miso soup", "--threshold", "0", "--catalog", str(trained), "--json").stdout)
    assert explicit[0]["chosen"] and explicit[0]["options"]["threshold"] == 0


def test_evaluate_routing_reports_ece_and_abstention_precision_and_recall(trained, tmp_path):
    labelled = tmp_path / "held.jsonl"
    labelled.write_text("".join(json.dumps({"prompt": p, "expert": d}) + "\n" for p, d in held_out()))
    outside = tmp_path / "outside.txt"
    outside.write_text("# prompts no expert is for\n" + "\n".join(OUTSIDE) + "\n")
    res = invoke("evaluate", "routing", "--prompts", str(labelled), "--outside", str(outside), "--catalog", str(trained),
                 "-o", str(tmp_path / "ev"))
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    ab, cal = report["metrics"]["abstention"], report["metrics"]["calibration"]
    n_out = len([p for p in OUTSIDE if p])  # blank lines are skipped
    assert ab["outside"]["n"] == n_out and ab["outside"]["recall"] >= 0.85 and ab["precision"] >= 0.85
    assert ab["in_world"]["rate"] <= 0.03 and cal["ece"] <= 0.05
    assert "recall" in res.output and "ECE" in res.output
    assert "## Abstention" in (tmp_path / "ev" / "report.md").read_text()
    assert (tmp_path / "ev" / "calibration.png").is_file()  # the reliability diagram
    missing = invoke("evaluate", "routing", "--prompts", str(labelled), "--outside", str(tmp_path / "nope.txt"), "--catalog", str(trained))
    assert missing.exit_code == 1 and "cannot read --outside" in missing.output and "Traceback" not in missing.output


# --- images: a member under the floor costs nothing ------------------------------------------------


@pytest.fixture(scope="module")
def sd_catalog(tiny_sd, lora_files, tmp_path_factory) -> Path:
    from mixdiff_cli.experts.manage import add_expert, init_catalog

    path = tmp_path_factory.mktemp("floor") / "experts.yaml"
    init_catalog(path, base=str(tiny_sd))
    add_expert(path, str(lora_files[("sd1", "diffusers")]), name="ink", prompts=["an ink drawing of a cat", "ink sketch of a dog"])
    add_expert(path, str(lora_files[("sd1", "kohya")]), name="pixel", prompts=["pixel art of a house", "pixel art castle"])
    return path


def test_k2_under_the_floor_runs_one_expert_and_draws_top1s_image(sd_catalog, tmp_path):
    from mixdiff_cli.catalog.schema import load_catalog
    from mixdiff_cli.sampling.engine import Engine
    from mixdiff_cli.sampling.generate import generate_images
    from mixdiff_cli.sampling.options import GenerationOptions

    cat = load_catalog(sd_catalog)
    prompt = "an ink drawing of a cat"
    route = R.load_router(cat, "words").route([prompt], top_k=2, abstain=False)[0]
    assert route.probs["pixel"] < R.FLOOR * route.probs["ink"]  # the second expert is under the floor
    opts = GenerationOptions(seed=3, steps=4, width=64, height=64, encoder="words", abstain=False)
    engine = Engine.from_options(cat, opts)
    batches: list[int] = []
    hook = engine.denoiser.register_forward_pre_hook(lambda _m, args, kwargs: batches.append(int((args[0] if args else kwargs["sample"]).shape[0])),
                                                     with_kwargs=True)
    try:
        one = generate_images(cat, prompt, opts.updated(top_k=1), out_dir=tmp_path / "k1", engine=engine)
        k1_batches, batches[:] = list(batches), []
        two = generate_images(cat, prompt, opts.updated(top_k=2), out_dir=tmp_path / "k2", engine=engine)
    finally:
        hook.remove()
    assert batches == k1_batches and set(batches) == {2}  # one CFG pair per step: no forward for pixel
    assert [c["expert"] for c in two.route["chosen"]] == ["ink"] and "left out (weight" in two.route["reasons"]["pixel"]
    assert np.array_equal(np.asarray(Image.open(one.paths[0])), np.asarray(Image.open(two.paths[0])))


def test_an_expert_added_without_retraining_is_routed_not_abstained(tmp_path):
    from mixdiff_cli.catalog.model import Expert
    from mixdiff_cli.catalog.schema import edit_catalog, load_catalog
    from mixdiff_cli.routing.sync import extend_router

    path = make_catalog(tmp_path, DOMAINS, Path("/nonexistent/base"))
    train_router(path, config=TrainConfig(encoder="words"))
    with edit_catalog(path) as cat:  # dragons, wizards and castles: subjects the generic captions hold too
        cat.experts.append(Expert(name="fantasy", kind="lora", source="fantasy.safetensors", format="diffusers", sha256="f-sha",
                                  prompts=captions("fantasy", 40, "train")))
    extend_router(load_catalog(path), "fantasy")
    router = R.load_router(path)
    routes = router.route(captions("fantasy", 60, "heldout"))
    assert sum(bool(r.chosen) and r.chosen[0][0] == "fantasy" for r in routes) / 60 >= 0.85  # measured 0.933
    assert sum(not r.chosen for r in routes) / 60 <= 0.05  # measured 0.017
    assert sum(not r.chosen for r in router.route(OUTSIDE)) / len(OUTSIDE) >= 0.85
