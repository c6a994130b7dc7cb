"""Whole LoRA libraries: `add-expert FOLDER` in one command and one write, catalogs and routing that
stay fast and readable with hundreds of experts, and routing quality on a synthetic 500-LoRA library."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import packaged_files
from mixdiff_cli.catalog import index, yamlload
from mixdiff_cli.core.errors import CatalogError
from mixdiff_cli.catalog.discovery import packaged_catalog_path
from mixdiff_cli.catalog.schema import load_catalog
from mixdiff_cli.cli import app
from mixdiff_cli.core import fsutil
from mixdiff_cli.demo.library import build_library, concepts, write_lora
from mixdiff_cli.experts.library import import_library, unique_name
from mixdiff_cli.experts.manage import add_expert, init_catalog
from mixdiff_cli.routing import router as R
from mixdiff_cli.routing.generic import generic_captions
from mixdiff_cli.routing.encoders import WordsEncoder
from mixdiff_cli.routing.labels import expert_texts

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def catalog_writes(monkeypatch):
    """Every atomic write of a file named experts.yaml, by path."""
    writes: list[Path] = []
    real = fsutil.atomic_write

    def counting(target, data):
        if Path(target).name == "experts.yaml":
            writes.append(Path(target))
        return real(target, data)

    monkeypatch.setattr(fsutil, "atomic_write", counting)
    return writes


class Boom:
    """Unpickling this creates the file `path` (what a malicious checkpoint would do, harmlessly)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class CountingEncoder(WordsEncoder):
    def __init__(self):
        super().__init__()
        self.texts: list[str] = []

    def __call__(self, prompts):
        self.texts += list(prompts)
        return super().__call__(prompts)


# --- add-expert FOLDER ------------------------------------------------------------------------------


def test_a_nested_folder_lands_in_one_command_and_one_write(tmp_path, tiny_sd, lora_files, catalog_writes):
    lib, marker = tmp_path / "models" / "Lora", tmp_path / "unpickled"
    for sub in ("styles/old", "chars", ".thumbs"):
        (lib / sub).mkdir(parents=True)
    shutil.copyfile(lora_files[("sd1", "kohya")], lib / "styles" / "Pixel_Style.safetensors")
    (lib / "styles" / "Pixel_Style.json").write_text(json.dumps({"activation text": "pxl, pixel art", "description": "crisp pixel art", "preferred weight": 0.7}))
    (lib / "styles" / "Pixel_Style.preview.png").write_bytes(PNG)
    shutil.copyfile(lora_files[("sd1", "diffusers")], lib / "chars" / "Hero V2.safetensors")
    shutil.copyfile(lora_files[("sd1", "diffusers")], lib / "styles" / "old" / "hero-copy.safetensors")  # the same file again
    shutil.copytree(lora_files[("sd1", "peft")], lib / "chars" / "peft-adapter")  # a PEFT folder is one expert
    (lib / "README.txt").write_text("my LoRAs")
    (lib / ".thumbs" / "x.safetensors").write_text("hidden: never looked at")
    (lib / "chars" / "evil.ckpt").write_bytes(pickle.dumps(Boom(marker)))
    (lib / "chars" / "sneaky.safetensors").write_bytes(pickle.dumps(Boom(marker)))  # a pickle by content
    good = lora_files[("sd1", "kohya")].read_bytes()
    (lib / "styles" / "broken.safetensors").write_bytes(good[: len(good) // 2])
    catalog = tmp_path / "experts.yaml"
    init_catalog(catalog, base=str(tiny_sd))
    before = catalog.read_bytes()
    catalog_writes.clear()

    dry = run("add-expert", lib, "-c", catalog, "--dry-run")
    assert dry.exit_code == 1 and "would add 3, already present 1, refused 3" in dry.stderr, dry.output
    assert catalog.read_bytes() == before and not catalog_writes

    result = run("add-expert", lib, "-c", catalog, "--tag", "mine")
    assert result.exit_code == 1, result.output
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: 3 file(s) refused:") and all(n in error for n in ("evil.ckpt", "sneaky.safetensors", "broken.safetensors"))
    assert "refused chars/evil.ckpt:" in result.stderr and "never unpickles" in result.stderr and "truncated" in result.stderr
    assert not marker.exists()
    assert len(catalog_writes) == 1
    cat = load_catalog(catalog)
    assert sorted(cat.names) == ["hero-v2", "peft-adapter", "pixel_style"]
    pixel = cat.expert("pixel_style")
    assert pixel.trigger == ["pxl", "pixel art"] and pixel.description == "crisp pixel art" and pixel.default_weight == 0.7  # the sidecar
    assert pixel.preview == "models/Lora/styles/Pixel_Style.preview.png" and pixel.title == "pixel_style"
    assert pixel.tags[:1] == ["mine"] and {"pixel art", "cat", "red"} <= set(pixel.tags)  # --tag, then kohya's tags
    assert all("mine" in e.tags for e in cat.experts)

    again = run("--json", "add-expert", lib, "-c", catalog)
    summary = json.loads(again.stdout)
    assert again.exit_code == 1 and (summary["added"], summary["present"], summary["refused"]) == (0, 4, 3)
    assert {r["name"] for r in summary["rows"] if r["status"] == "present"} == {"hero-v2", "peft-adapter", "pixel_style"}
    assert len(catalog_writes) == 1 and not marker.exists()


def test_names_come_from_file_names_and_collisions_resolve_in_path_order(tmp_path):
    assert unique_name("My Style v2!", set()) == "my-style-v2"
    assert unique_name("foo", {"foo", "foo-2"}) == "foo-3"
    assert len(unique_name("x" * 80, {"x" * 64})) == 64
    a, b, c = concepts(3, seed=5)
    write_lora(tmp_path / "lib" / "b" / "Foo.safetensors", a)
    write_lora(tmp_path / "lib" / "a" / "foo.safetensors", b)
    write_lora(tmp_path / "single" / "foo.safetensors", c)
    catalog = tmp_path / "experts.yaml"
    init_catalog(catalog)
    add_expert(catalog, str(tmp_path / "single" / "foo.safetensors"), name="foo")
    result = import_library(catalog, [tmp_path / "lib"])
    assert [(Path(r.source).parent.name, r.name) for r in result.rows] == [("a", "foo-2"), ("b", "foo-3")]


def test_an_empty_folder_is_an_error_and_options_for_one_expert_are_refused(tmp_path, catalog_writes):
    catalog = tmp_path / "experts.yaml"
    init_catalog(catalog)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no weights here")
    result = run("add-expert", tmp_path / "empty", "-c", catalog)
    assert result.exit_code == 1 and "holds no weights files" in result.stderr
    for i, c in enumerate(concepts(2, seed=1)):
        write_lora(tmp_path / "two" / f"l{i}.safetensors", c)
    result = run("add-expert", tmp_path / "two", "-c", catalog, "--name", "x")
    assert result.exit_code == 2 and "--name" in result.output
    assert len(catalog_writes) == 1  # init's


# --- scale: what does not depend on time ------------------------------------------------------------


@pytest.fixture(scope="module")
def library_200(tmp_path_factory):
    return build_library(tmp_path_factory.mktemp("lib200"), 200, seed=3)


def test_a_200_expert_catalog_reads_from_its_index_and_writes_only_what_changed(library_200, tmp_path, monkeypatch, catalog_writes):
    catalog = tmp_path / "experts.yaml"
    init_catalog(catalog)
    result = import_library(catalog, [library_200 / "loras"])
    assert result.count("added") == 200 and len(catalog_writes) == 2  # init and the import
    assert catalog.stat().st_size > index.INDEX_MIN_BYTES

    index._MEMO.clear()  # a new process: the index on disk, no YAML parsing
    parse = yamlload._Loader.catalog
    monkeypatch.setattr(yamlload._Loader, "catalog", lambda *a: pytest.fail("parsed the YAML"))
    cat = load_catalog(catalog)
    assert len(cat.experts) == 200 and cat.expert(cat.names[7]).tags

    dumped: list[str] = []
    real_dump = index._dump
    monkeypatch.setattr(index, "_dump", lambda data: dumped.append(data) or real_dump(data))
    monkeypatch.setattr(yamlload._Loader, "catalog", parse)
    extra = write_lora(tmp_path / "extra" / "one-more.safetensors", concepts(1, seed=99)[0])
    add_expert(catalog, str(extra))
    assert len(dumped) == 2  # the catalog's head and the new expert: the other 200 keep their text
    index._MEMO.clear()
    monkeypatch.setattr(index, "_index_path", lambda path: tmp_path / "no-index.json")  # parse the written text
    fresh = load_catalog(catalog)
    assert fresh.to_dict() == cat.to_dict() | {"experts": cat.to_dict()["experts"] + [fresh.experts[-1].to_dict()]}

    text = catalog.read_text()  # a hand edit the index has not seen: parsed again, strictly, with file:line
    catalog.write_text(text.replace("  kind: lora\n", "  kind: lora\n  colour: red\n", 1))
    with pytest.raises(CatalogError, match=r"experts.yaml:\d+: unknown key 'colour'"):
        load_catalog(catalog)


def test_prototypes_update_incrementally_and_routing_ignores_generic_triggers(library_200, tmp_path):
    catalog = tmp_path / "experts.yaml"
    init_catalog(catalog)
    import_library(catalog, [library_200 / "loras"])
    cat = load_catalog(catalog)
    first = CountingEncoder()
    router = R.prototype_router(cat, first)
    n_texts = sum(len(expert_texts(e)) for e in cat.experts)
    # each text once for the rows; the abstention's calibration embeds a sample of 2048 of them and the generic captions
    assert len(first.texts) == n_texts + min(n_texts, 2048) + len(generic_captions())
    assert "1girl" in router.generic_triggers and "1girl" not in router.triggers  # kohya's most frequent tag on many files

    extra = write_lora(tmp_path / "more" / "new-one.safetensors", concepts(1, seed=42)[0])
    import_library(catalog, [extra])
    bigger = load_catalog(catalog)
    second = CountingEncoder()
    R.prototype_router(bigger, second)
    assert second.texts == expert_texts(bigger.experts[-1])  # the new expert's texts, nothing else
    third = CountingEncoder()
    again = R.prototype_router(load_catalog(catalog), third)
    assert third.texts == [] and again.names == bigger.names


def test_a_trained_router_takes_a_whole_import_and_train_reports_pairs(library_200, tmp_path):
    from mixdiff_cli.routing.checkpoint import read_checkpoint
    from mixdiff_cli.routing.train import TrainConfig, train_router

    catalog = tmp_path / "experts.yaml"
    init_catalog(catalog)
    files = sorted((library_200 / "loras").rglob("*.safetensors"))
    import_library(catalog, files[:60])
    names = set(load_catalog(catalog).names)
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(line + "\n" for line in (library_200 / "heldout.jsonl").read_text().splitlines() if json.loads(line)["expert"] in names))
    res = train_router(catalog, prompts_file=labels, config=TrainConfig(encoder="words", epochs=20, val_split=0.5))
    assert res.n_val == 60 and res.confusion == [] and "confusion" not in res.to_dict()  # 60 experts: no 60x60 matrix...
    assert sum(n for _, _, n in res.confused) == round((1 - res.top1) * res.n_val)  # ...the confused pairs instead
    result = import_library(catalog, files[60:63])
    assert result.count("added") == 3
    ckpt = read_checkpoint(res.checkpoint)
    assert ckpt.names == load_catalog(catalog).names and [x["row"] for x in ckpt.experts[-3:]] == ["prototype"] * 3


def test_experts_list_filters_and_pages(library_200, tmp_path):
    catalog = tmp_path / "experts.yaml"
    init_catalog(catalog)
    import_library(catalog, [library_200 / "loras"])
    cat = load_catalog(catalog)
    style = cat.experts[0].tags[2]
    rows = json.loads(run("experts", "list", "-c", catalog, "--tag", style, "--json").stdout)
    assert rows and all(style in r["tags"] for r in rows) and len(rows) < 200
    assert json.loads(run("experts", "list", "-c", catalog, "--format", "diffusers", "--json").stdout) == []
    assert len(json.loads(run("experts", "list", "-c", catalog, "--arch", "sd1", "--json").stdout)) == 200
    token = cat.experts[5].trigger[0]
    found = json.loads(run("experts", "list", token.upper(), "-c", catalog, "--json").stdout)
    assert [r["name"] for r in found] == [cat.experts[5].name]
    page = json.loads(run("experts", "list", "-c", catalog, "--limit", "5", "--offset", "5", "--json").stdout)
    assert [r["name"] for r in page] == cat.names[5:10]
    human = run("experts", "list", "-c", catalog)
    assert human.exit_code == 0 and "1-50 of 200 experts; --offset 50 for the next page" in human.stderr
    assert run("experts", "list", "-c", catalog, "--arch", "sd3").exit_code == 2


def test_the_packaged_demo_keeps_its_prototype_cache_in_the_user_folder(no_catalog):
    before = packaged_files()
    R.prototype_router(load_catalog(packaged_catalog_path()), WordsEncoder())
    assert packaged_files() == before
    assert list((no_catalog / "mixdiff-home" / "cache" / "prototypes").glob("*.safetensors"))


# --- routing quality on a 500-LoRA library ------------------------------------------------------------


@pytest.fixture(scope="module")
def library_500(tmp_path_factory):
    folder = build_library(tmp_path_factory.mktemp("lib500"), 500, seed=0)
    init_catalog(folder / "experts.yaml")
    import_library(folder / "experts.yaml", [folder / "loras"])
    return folder


def test_routing_500_kohya_loras_from_their_tags(library_500, tmp_path):
    # measured: top-1 88.4%, top-5 99.1% on 1,000 held-out prompts (the README's figure)
    out = tmp_path / "eval"
    result = run("--json", "evaluate", "routing", "--prompts", library_500 / "heldout.jsonl", "-c", library_500 / "experts.yaml",
                 "--encoder", "words", "--top-k", "5", "-o", out)
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)["metrics"]
    head = m["headline"]
    assert m["n"] == 1000 and len(m["experts"]) == 500
    assert head["top1_accuracy"] >= 0.84 and head["topk_accuracy"] >= 0.97 and head["topn"]["5"] == head["topk_accuracy"]
    assert head["top1_accuracy"] >= head["gate_top1_accuracy"]  # trigger tokens in some prompts only help
    assert m["confusion"]["matrix"] is None and m["confused"]  # readable at 500: the most-confused pairs
    report = (out / "report.md").read_text()
    assert "Most-confused pairs" in report and "Confusion matrix" not in report and max(map(len, report.splitlines())) < 1000
    assert {"confused.png", "topn.png", "usage.png", "calibration.png"} <= {p.name for p in out.glob("*.png")}
