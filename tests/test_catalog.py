"""The catalog schema, strict loading, discovery and atomic locked writes (no models needed)."""

from __future__ import annotations

import os
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from conftest import packaged_files

from mixdiff_cli.catalog import discovery as catmod
from mixdiff_cli.catalog.discovery import find_catalog
from mixdiff_cli.catalog.model import Base, Catalog, Expert
from mixdiff_cli.catalog.schema import edit_catalog, load_catalog, save_catalog
from mixdiff_cli.core.errors import CatalogError, CatalogNotFound, ExpertNotFound, MixdiffWarning, ReadOnlyCatalog


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


GOOD = """
version: 1
base:
  source: models/base
  arch: sd1
  guidance: 3
router: null
experts:
  - name: watercolor
    kind: lora
    source: experts/watercolor.safetensors
    format: kohya
    sha256: "%s"
    rank: 8
    alpha: 4
    prompts: ["a watercolor harbour"]
    trigger: [wtrclr]
    default_weight: 0.8
    added: 2026-11-26T10:00:00+00:00
""" % ("ab" * 32)


def test_roundtrip_keeps_every_field(tmp_path):
    cat = load_catalog(write(tmp_path / "experts.yaml", GOOD))
    exp = cat.expert("watercolor")
    assert (exp.rank, exp.alpha, exp.default_weight, exp.trigger) == (8, 4.0, 0.8, ["wtrclr"])
    assert exp.short_hash == "ab" * 5
    assert exp.added == "2026-11-26T10:00:00+00:00"
    assert cat.base.guidance == 3.0
    save_catalog(cat)
    again = load_catalog(cat.path)
    assert again.to_dict() == cat.to_dict()
    assert again.hash() == cat.hash()


@pytest.mark.parametrize(
    "edit, line, words",
    [
        (("    rank: 8\n", "    rank: 8\n    colour: red\n"), 14, ["unknown key 'colour'", "Allowed keys"]),
        (("    rank: 8\n", "    rank: eight\n"), 13, ["rank must be an integer"]),
        (("  guidance: 3\n", "  guidance: high\n"), 5, ["guidance must be a number"]),
        (("    kind: lora\n", "    kind: checkpoint\n"), 9, ["kind is 'checkpoint'", "lora, model"]),
        (("    prompts: [\"a watercolor harbour\"]\n", "    prompts: a harbour\n"), 15, ["prompts must be a list of strings"]),
        (("router: null\n", "router: null\nmodels: []\n"), 7, ["unknown key 'models'"]),
        (("  - name: watercolor\n", "  - name: Water Color\n"), 8, ["invalid expert name"]),
        (("    format: kohya\n", "    format: kohya\n   bad: [\n"), None, ["YAML syntax error"]),
    ],
)
def test_bad_catalogs_name_file_line_and_fix(tmp_path, edit, line, words):
    text = textwrap.dedent(GOOD).lstrip().replace(*edit)
    path = tmp_path / "experts.yaml"
    path.write_text(text)
    with pytest.raises(CatalogError) as err:
        load_catalog(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:")
    if line is not None:
        assert msg.startswith(f"{path}:{line}:"), msg
    for word in words:
        assert word in msg
    assert err.value.hint


def test_duplicate_names_rejected(tmp_path):
    text = textwrap.dedent(GOOD).lstrip()
    entry = text[text.index("  - name"):]
    path = tmp_path / "experts.yaml"
    path.write_text(text + entry)
    with pytest.raises(CatalogError, match="appears twice"):
        load_catalog(path)


@pytest.mark.parametrize(
    "tagged",
    [
        "!!python/name:{module}.ROUTER ''",  # a scalar: the loader constructs scalars, so this must stay unconstructed
        "!!python/object/apply:{module}.router []",  # what yaml.unsafe_load of the whole file would call
    ],
)
def test_never_constructs_python_objects(tmp_path, monkeypatch, tagged):
    # Constructing either tag imports a module that leaves a file behind and yields a string, a valid
    # `router:` value: only refusing the tag itself keeps the file from appearing and the load from passing.
    module = f"mixdiff_evil_{abs(hash(tmp_path)):x}"
    mark = tmp_path / "constructed"
    (tmp_path / f"{module}.py").write_text(
        f"open({str(mark)!r}, 'w').close()\nROUTER = 'router.safetensors'\ndef router():\n    return ROUTER\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write(tmp_path / "experts.yaml", "version: 1\nrouter: " + tagged.format(module=module) + "\n")
    with pytest.raises(CatalogError, match=r"experts.yaml:2: router"):
        load_catalog(path)
    assert not mark.exists() and module not in sys.modules


def test_unknown_expert_lists_known(tmp_path):
    cat = load_catalog(write(tmp_path / "experts.yaml", GOOD))
    with pytest.raises(ExpertNotFound, match="Known experts: watercolor"):
        cat.expert("oil")


def test_discovery_order(tmp_path, monkeypatch):
    monkeypatch.delenv("MIXDIFF_CATALOG", raising=False)
    monkeypatch.setenv("MIXDIFF_HOME", str(tmp_path / "home"))
    nested = tmp_path / "proj" / "a" / "b"
    nested.mkdir(parents=True)
    monkeypatch.chdir(nested)
    monkeypatch.setattr(catmod, "packaged_catalog_path", lambda: tmp_path / "nowhere.yaml")
    with pytest.raises(CatalogNotFound, match="no catalog found"):
        find_catalog()
    user = tmp_path / "home" / "experts.yaml"
    user.parent.mkdir()
    user.write_text("version: 1\n")
    assert find_catalog() == user
    walked = write(tmp_path / "proj" / "experts.yaml", "version: 1\n")
    assert find_catalog() == walked
    env = write(tmp_path / "env.yaml", "version: 1\n")
    monkeypatch.setenv("MIXDIFF_CATALOG", str(env))
    assert find_catalog() == env
    explicit = write(tmp_path / "explicit.yaml", "version: 1\n")
    assert find_catalog(explicit) == explicit
    with pytest.raises(CatalogNotFound, match="does not exist"):
        find_catalog(tmp_path / "missing.yaml")


def test_writes_never_fall_back_to_the_packaged_demo(no_catalog):
    demo = catmod.packaged_catalog_path()
    assert find_catalog() == demo  # reads still fall back to it
    with pytest.raises(CatalogNotFound, match=r"^no catalog here: run 'mixdiff init'"):
        find_catalog(for_write=True)
    for path in (demo, demo.parent, demo.parent / "base" / ".." / "experts.yaml"):
        with pytest.raises(ReadOnlyCatalog, match="packaged demo"):
            find_catalog(path, for_write=True)
    user = write(catmod.user_catalog_path(), "version: 1\n")
    assert find_catalog(for_write=True) == user


def test_library_writes_refuse_the_packaged_demo(no_catalog):
    from mixdiff_cli.experts.manage import add_expert, init_catalog, remove_expert
    from mixdiff_cli.routing.train import train_router
    from mixdiff_cli.training.config import FineTuneJob
    from mixdiff_cli.training.finetune import fine_tune

    demo = catmod.packaged_catalog_path()
    before = packaged_files()
    attempts = {
        "train_router": lambda: train_router(demo),
        "train_router output": lambda: train_router(write(no_catalog / "cwd" / "experts.yaml", "version: 1\n"), output=demo.parent / "r.safetensors"),
        "fine_tune": lambda: fine_tune(FineTuneJob(demo, no_catalog / "images", "again")),
        "fine_tune output": lambda: fine_tune(FineTuneJob(None, no_catalog / "images", "again", base=demo.parent / "base", register=False, output_dir=demo.parent / "runs")),
        "edit_catalog": lambda: edit_catalog(demo).__enter__(),
        "save_catalog": lambda: save_catalog(load_catalog(demo)),
        "remove_expert": lambda: remove_expert(demo, "shapes"),
        "add_expert": lambda: add_expert(demo, str(demo.parent / "experts" / "shapes.safetensors"), name="again"),
        "init_catalog": lambda: init_catalog(demo, force=True),
    }
    for what, attempt in attempts.items():
        with pytest.raises(ReadOnlyCatalog, match="packaged demo"):
            attempt()
            pytest.fail(f"{what} wrote to the packaged demo")
    assert packaged_files() == before
    assert [p.name for p in no_catalog.joinpath("cwd").iterdir()] == ["experts.yaml"]  # the one written above


def test_a_catalog_sharing_the_packaged_router_leaves_it_alone(no_catalog):
    """Like the repository's root catalog: edits land in the catalog; the packaged router is not rewritten."""
    demo = load_catalog(catmod.packaged_catalog_path())
    mine = Catalog(path=no_catalog / "cwd" / "experts.yaml", base=demo.base, router=str(demo.router_path()), experts=demo.experts)
    mine.base.source = str(demo.resolve(demo.base.source))
    for exp in mine.experts:
        exp.source = str(demo.resolve(exp.source))
    save_catalog(mine)
    before = packaged_files()
    from mixdiff_cli.experts.manage import remove_expert

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MixdiffWarning)
        remove_expert(mine.path, "glyphs")
    assert load_catalog(mine.path).names == ["shapes", "stripes", "landscapes"]
    assert any("router checkpoint was not updated" in str(w.message) and "packaged demo" in str(w.message) for w in caught), caught
    assert packaged_files() == before


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = write(tmp_path / "experts.yaml", GOOD)
    before = path.read_bytes()

    def crash(*_args):
        raise OSError("killed mid-rename")

    monkeypatch.setattr(os, "replace", crash)
    from mixdiff_cli.core.errors import OutputError

    with pytest.raises(OutputError, match=f"cannot write {path}: killed mid-rename"):  # a failed write names its file
        with edit_catalog(path) as cat:
            cat.experts.clear()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".experts.yaml.lock")) == ["experts.yaml"]


def test_error_inside_edit_writes_nothing(tmp_path):
    path = write(tmp_path / "experts.yaml", GOOD)
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with edit_catalog(path) as cat:
            cat.experts.clear()
            raise RuntimeError("boom")
    assert path.read_bytes() == before


def test_relative_sources_resolve_against_catalog(tmp_path):
    cat = Catalog(path=tmp_path / "sub" / "experts.yaml", base=Base(source="models/base"))
    cat.experts.append(Expert(name="x", kind="lora", source="experts/x.safetensors", format="diffusers"))
    assert cat.resolve("experts/x.safetensors") == tmp_path / "sub" / "experts" / "x.safetensors"
    assert cat.relative_source(tmp_path / "sub" / "a" / "b.safetensors") == "a/b.safetensors"
    assert cat.relative_source(tmp_path / "elsewhere.safetensors") == str(tmp_path / "elsewhere.safetensors")


# --- identity: what the router sees, wherever the files lie ----------------------------------------

REPO = Path(__file__).resolve().parent.parent


def fake_base(folder: Path, seed: int = 0) -> Path:
    """A base folder with weight files of random bytes (the fingerprint reads bytes, not tensors)."""
    import random

    rng = random.Random(seed)
    for rel, size in (("unet/diffusion_pytorch_model.safetensors", 3 << 20), ("text_encoder/model.safetensors", 4096)):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(rng.randbytes(size))
    (folder / "model_index.json").write_text("{}")
    return folder


def test_hash_covers_what_the_experts_and_base_are_not_where_they_lie(tmp_path):
    fake_base(tmp_path / "a" / "base")
    (tmp_path / "b" / "c").mkdir(parents=True)
    here = load_catalog(write(tmp_path / "a" / "experts.yaml", GOOD.replace("models/base", "base")))
    there = load_catalog(write(tmp_path / "b" / "c" / "experts.yaml", GOOD.replace("models/base", str(tmp_path / "a" / "base"))))
    there.experts[0].source = "/elsewhere/watercolor.safetensors"
    assert here.base_identity()["content"].startswith("sample:") and here.hash() == there.hash()
    for change in (  # not what the router sees: same hash
        lambda c: c.experts[0].prompts.append("a watercolor fox"),
        lambda c: setattr(c.experts[0], "default_weight", 0.5),
        lambda c: setattr(c.experts[0], "description", "soft washes"),
    ):
        change(there)
        assert there.hash() == here.hash()
    fake_base(tmp_path / "other", seed=1)
    for change in (  # what an expert or the base is: another hash
        lambda c: setattr(c.experts[0], "name", "aquarelle"),
        lambda c: setattr(c.experts[0], "sha256", "cd" * 32),
        lambda c: setattr(c.experts[0], "kind", "model"),
        lambda c: setattr(c.experts[0], "arch", "sdxl"),
        lambda c: c.experts.append(Expert(name="ink", kind="lora", source="ink.safetensors", format="diffusers", sha256="ef" * 32)),
        lambda c: setattr(c.base, "arch", "sd2"),
        lambda c: setattr(c.base, "sha256", "12" * 32),
        lambda c: setattr(c.base, "source", str(tmp_path / "other")),
        lambda c: setattr(c.base, "source", str(tmp_path / "missing")),
    ):
        changed = load_catalog(here.path)
        change(changed)
        assert changed.hash() != here.hash()
    # the same base folder with one weight file rewritten in place (same size) is another base
    before = here.hash()
    weights = tmp_path / "a" / "base" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(bytes(weights.stat().st_size))
    assert here.hash() != before


def test_root_catalog_is_the_packaged_demo_seen_from_the_repository_root():
    from mixdiff_cli.routing.router import router_status

    root, packaged = load_catalog(REPO / "experts.yaml"), load_catalog(catmod.packaged_catalog_path())
    assert root.names == packaged.names == ["shapes", "stripes", "landscapes", "glyphs"]
    for mine, theirs in zip(root.experts, packaged.experts):
        assert mine.sha256 and mine.sha256 == theirs.sha256
        assert {**mine.to_dict(), "source": None} == {**theirs.to_dict(), "source": None}
        assert root.resolve(mine.source).resolve() == packaged.resolve(theirs.source).resolve()
        assert root.resolve(mine.source).is_file()
    assert root.resolve(root.base.source).resolve() == packaged.resolve(packaged.base.source).resolve()
    assert root.router_path().resolve() == packaged.router_path().resolve()
    assert root.hash() == packaged.hash()
    for cat in (root, packaged):
        status = router_status(cat)
        assert status["kind"] == "trained" and status["matches_catalog"] is True, status.get("problem")


def test_the_root_catalog_is_found_from_the_repository_only_without_the_test_catalog(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(CatalogNotFound, match="MIXDIFF_CATALOG"):  # conftest's (missing) catalog wins: tests never see it
        find_catalog()
    monkeypatch.delenv("MIXDIFF_CATALOG")
    assert find_catalog() == REPO / "experts.yaml"
    monkeypatch.chdir(REPO / "mixdiff_cli")
    assert find_catalog() == REPO / "experts.yaml"
