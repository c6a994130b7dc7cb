"""`init`, `add-expert`, `experts list|show|remove|verify` on the tiny fixtures, and every bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import packaged_files
import yaml
from typer.testing import CliRunner

from mixdiff_cli.cli import app
from mixdiff_cli.catalog.discovery import packaged_catalog_path
from mixdiff_cli.catalog.schema import load_catalog

runner = CliRunner()
MIXDIFF = str(Path(sys.executable).with_name("mixdiff"))


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def catalog(tmp_path, tiny_sd):
    path = tmp_path / "experts.yaml"
    result = run("init", "--catalog", path, "--base", tiny_sd)
    assert result.exit_code == 0, result.output
    return path


def test_init_records_base_and_architecture(catalog, tiny_sd):
    cat = load_catalog(catalog)
    assert cat.base.arch == "sd1"
    assert cat.resolve(cat.base.source).resolve() == Path(tiny_sd).resolve()
    again = run("init", "--catalog", catalog)
    assert again.exit_code == 1 and "already exists" in again.stderr


@pytest.mark.parametrize("fmt", ["diffusers", "peft", "kohya"])
def test_add_each_lora_format(catalog, lora_files, fmt):
    src = lora_files[("sd1", fmt)]
    result = run("add-expert", src, "--catalog", catalog, "--name", f"style-{fmt}", "--prompt", "a red square", "--trigger", "zxq")
    assert result.exit_code == 0, result.output
    exp = load_catalog(catalog).expert(f"style-{fmt}")
    weights = src if Path(src).is_file() else Path(src) / "adapter_model.safetensors"
    assert (exp.kind, exp.format, exp.arch, exp.rank) == ("lora", fmt, "sd1", 4)
    assert exp.sha256 == sha(weights)
    assert exp.short_hash in result.stdout
    assert exp.prompts == ["a red square"] and exp.trigger == ["zxq"]


def test_list_show_remove_verify(catalog, lora_files):
    assert run("add-expert", lora_files[("sd1", "diffusers")], "-c", catalog, "--name", "one").exit_code == 0
    assert run("register", lora_files[("sd1", "kohya")], "-c", catalog, "--name", "two").exit_code == 0

    listed = run("experts", "list", "-c", catalog, "--json")
    assert listed.exit_code == 0
    assert [row["name"] for row in json.loads(listed.stdout)] == ["one", "two"]
    assert "one" in run("experts", "list", "-c", catalog).stdout

    shown = json.loads(run("--json", "experts", "show", "two", "-c", catalog).stdout)
    assert shown["format"] == "kohya" and len(shown["autov2"]) == 10

    verified = run("experts", "verify", "-c", catalog, "--json")
    assert verified.exit_code == 0
    assert {r["status"] for r in json.loads(verified.stdout)} == {"ok"}

    assert run("experts", "remove", "one", "-c", catalog).exit_code == 0
    assert load_catalog(catalog).names == ["two"]
    missing = run("experts", "show", "one", "-c", catalog)
    assert missing.exit_code == 1 and "Known experts: two" in missing.stderr


def test_full_model_experts(catalog, full_model, tmp_path):
    result = run("add-expert", full_model, "-c", catalog, "--name", "big")
    assert result.exit_code == 0, result.output
    exp = load_catalog(catalog).expert("big")
    assert (exp.kind, exp.format) == ("model", "diffusers-model")
    assert run("experts", "verify", "-c", catalog).exit_code == 0


def test_copy_puts_file_beside_catalog(catalog, lora_files):
    src = lora_files[("sd1", "diffusers")]
    assert run("add-expert", src, "-c", catalog, "--name", "copied", "--copy").exit_code == 0
    exp = load_catalog(catalog).expert("copied")
    assert exp.source == "experts/copied.safetensors"
    assert sha(catalog.parent / exp.source) == sha(Path(src))


def test_sidecar_metadata_fills_trigger_and_description(catalog, lora_files, tmp_path):
    src = tmp_path / "inked.safetensors"
    shutil.copyfile(lora_files[("sd1", "diffusers")], src)
    src.with_suffix(".json").write_text(json.dumps({"activation text": "inkd style", "preferred weight": 0.7, "description": "ink drawings"}))
    assert run("add-expert", src, "-c", catalog).exit_code == 0
    exp = load_catalog(catalog).expert("inked")
    assert (exp.trigger, exp.default_weight, exp.description) == (["inkd style"], 0.7, "ink drawings")


def test_moved_file_fails_verify(catalog, lora_files, tmp_path):
    src = tmp_path / "moving.safetensors"
    shutil.copyfile(lora_files[("sd1", "diffusers")], src)
    assert run("add-expert", src, "-c", catalog).exit_code == 0
    src.rename(tmp_path / "moved.safetensors")
    before = catalog.read_bytes()
    result = run("experts", "verify", "-c", catalog)
    assert result.exit_code == 1
    assert "moving (missing)" in result.stderr and "Re-add" in result.stderr
    assert catalog.read_bytes() == before


def test_changed_file_fails_verify(catalog, lora_files, tmp_path):
    src = tmp_path / "edited.safetensors"
    shutil.copyfile(lora_files[("sd1", "diffusers")], src)
    assert run("add-expert", src, "-c", catalog).exit_code == 0
    shutil.copyfile(lora_files[("sd1", "kohya")], src)
    result = run("experts", "verify", "-c", catalog)
    assert result.exit_code == 1 and "edited (mismatch)" in result.stderr


# --- bad input: one line, exit code, the catalog byte-for-byte unchanged --------------------------


def _bad_inputs(tmp_path: Path, lora_files) -> dict[str, tuple[list[str], int, list[str]]]:
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, I am not a tensor file")
    good = Path(lora_files[("sd1", "diffusers")])
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\xff" * 8 + b"{not json")
    pickle = tmp_path / "old.ckpt"
    pickle.write_bytes(b"\x80\x04\x95PK fake pickle")
    return {
        "missing path": ([str(tmp_path / "nope.safetensors")], 1, ["nope.safetensors"]),
        "empty folder": ([str(empty)], 1, ["empty-folder"]),
        "not safetensors": ([str(text)], 1, ["notes.safetensors", "safetensors"]),
        "truncated": ([str(truncated)], 1, ["truncated.safetensors"]),
        "corrupt": ([str(corrupt)], 1, ["corrupt.safetensors"]),
        "pickle": ([str(pickle)], 1, ["never unpickle", "safetensors"]),
        "sdxl lora on sd1": ([str(lora_files[("sdxl", "diffusers")])], 1, ["LoRA for SDXL, base is SD 1.x"]),
        "invalid name": ([str(good), "--name", "Bad Name!"], 1, ["invalid expert name"]),
        "bad kind": ([str(good), "--kind", "checkpoint"], 2, ["checkpoint"]),
        "wrong kind": ([str(good), "--kind", "model"], 2, ["is a lora, not a model"]),
        "offline hub miss": (["hf://nobody/no-such-lora/x.safetensors@main"], 1, ["nobody/no-such-lora", "HF_HUB_OFFLINE"]),
    }


BAD = [
    "missing path", "empty folder", "not safetensors", "truncated", "corrupt", "pickle", "sdxl lora on sd1",
    "invalid name", "bad kind", "wrong kind", "offline hub miss",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_clear_line(catalog, lora_files, tmp_path, case):
    assert run("add-expert", lora_files[("sd1", "kohya")], "-c", catalog, "--name", "existing").exit_code == 0
    before = catalog.read_bytes()
    args, code, words = _bad_inputs(tmp_path, lora_files)[case]
    result = run("add-expert", *args, "-c", catalog)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.stderr, result.stderr
    if code == 1:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
    assert catalog.read_bytes() == before


def test_duplicate_name_refused(catalog, lora_files):
    assert run("add-expert", lora_files[("sd1", "kohya")], "-c", catalog, "--name", "dup").exit_code == 0
    before = catalog.read_bytes()
    result = run("add-expert", lora_files[("sd1", "diffusers")], "-c", catalog, "--name", "dup")
    assert result.exit_code == 1 and "already exists" in result.stderr and "--name" in result.stderr
    assert catalog.read_bytes() == before


@pytest.mark.parametrize(
    "edit, words",
    [(("version: 1", "version: 1\nversion_typo: 2"), ["unknown key 'version_typo'"]), (("experts:", "experts: [\n"), ["YAML syntax error"])],
)
def test_broken_catalog_refused_with_line(catalog, lora_files, edit, words):
    catalog.write_text(catalog.read_text().replace(*edit))
    before = catalog.read_bytes()
    for args in (["experts", "list"], ["add-expert", lora_files[("sd1", "kohya")]]):
        result = run(*args, "-c", catalog)
        assert result.exit_code == 1, result.output
        assert f"{catalog}:" in result.stderr and all(w in result.stderr for w in words)
        assert "Traceback" not in result.output
    assert catalog.read_bytes() == before


def test_debug_env_shows_traceback(catalog, tmp_path):
    env = {**os.environ, "MIXDIFF_DEBUG": "1"}
    proc = subprocess.run([MIXDIFF, "add-expert", str(tmp_path / "nope.safetensors"), "-c", str(catalog)], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_sixteen_concurrent_add_expert_processes(catalog, lora_files, tmp_path):
    src = str(lora_files[("sd1", "diffusers")])
    procs = [
        subprocess.Popen([MIXDIFF, "--quiet", "add-expert", src, "-c", str(catalog), "--name", f"par-{i:02d}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i in range(16)
    ]
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0] * 16, [p.stderr.read() for p in procs]
    data = yaml.safe_load(catalog.read_text())
    assert sorted(e["name"] for e in data["experts"]) == [f"par-{i:02d}" for i in range(16)]
    assert len(load_catalog(catalog).experts) == 16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".experts.yaml.") and not p.name.endswith(".lock")]


def test_installed_entry_point(catalog, lora_files):
    version = subprocess.run([MIXDIFF, "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("mixdiff ")
    module = subprocess.run([sys.executable, "-m", "mixdiff_cli", "experts", "list", "-c", str(catalog), "--json"], capture_output=True, text=True)
    assert module.returncode == 0 and json.loads(module.stdout) == []
    usage = subprocess.run([MIXDIFF, "experts", "list", "--no-such-flag"], capture_output=True, text=True)
    assert usage.returncode == 2


def test_light_commands_import_no_heavy_frameworks(catalog, lora_files):
    assert run("add-expert", lora_files[("sd1", "peft")], "-c", catalog, "--name", "p").exit_code == 0
    code = f"""
import sys
from typer.testing import CliRunner
from mixdiff_cli.cli import app
r = CliRunner()
for args in (["--help"], ["experts", "list", "-c", {str(catalog)!r}], ["experts", "show", "p", "-c", {str(catalog)!r}]):
    assert r.invoke(app, args).exit_code == 0, args
print(",".join(m for m in ("torch", "diffusers", "transformers", "peft", "accelerate") if m in sys.modules))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def test_completions_are_fresh_and_complete_expert_names(catalog, lora_files):
    from mixdiff_cli.cli.completions import SHELLS, completion_script

    root = Path(__file__).resolve().parents[1] / "completions"
    for shell, name in SHELLS.items():
        assert (root / name).read_text() == completion_script(shell), f"{name} is stale: run 'make completions'"
    assert run("add-expert", lora_files[("sd1", "kohya")], "-c", catalog, "--name", "ink-style").exit_code == 0
    env = {**os.environ, "_MIXDIFF_COMPLETE": "complete_bash", "COMP_WORDS": "mixdiff experts show in", "COMP_CWORD": "3", "MIXDIFF_CATALOG": str(catalog)}
    proc = subprocess.run([MIXDIFF], capture_output=True, text=True, env=env)
    assert "ink-style" in proc.stdout.split()


# --- the packaged demo is read-only; `experts list` fits a terminal -------------------------------


def test_write_commands_never_touch_the_packaged_demo(no_catalog, tmp_path):
    demo = packaged_catalog_path()
    mine = tmp_path / "mine.safetensors"  # a LoRA that fits the demo's base: adding it would succeed
    shutil.copyfile(demo.parent / "experts" / "shapes.safetensors", mine)
    labeled = tmp_path / "labeled.jsonl"
    labeled.write_text('{"prompt": "a red square", "expert": "shapes"}\n{"prompt": "thin stripes", "expert": "stripes"}\n')
    (tmp_path / "images").mkdir()
    before = packaged_files()
    commands = {
        "add-expert": ["add-expert", mine, "--name", "mine"],
        "experts remove": ["experts", "remove", "shapes"],
        "router train": ["router", "train", "--prompts", labeled, "--encoder", "words", "--epochs", "1"],
        "fine-tune": ["fine-tune", tmp_path / "images", "--name", "mine", "--steps", "1"],
    }
    for what, args in commands.items():
        result = run(*args)
        assert result.exit_code == 1, (what, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: no catalog here: run 'mixdiff init'"), (what, result.stderr)
        named = run(*args, "--catalog", demo)  # naming the demo does not make it writable either
        assert named.exit_code == 1 and "packaged demo" in named.stderr, (what, named.output)
    assert packaged_files() == before
    assert list((no_catalog / "cwd").iterdir()) == []
    listed = run("experts", "list", "--json")  # reads still fall back to the demo
    assert listed.exit_code == 0, listed.output
    assert [row["name"] for row in json.loads(listed.stdout)] == ["shapes", "stripes", "landscapes", "glyphs"]


def test_experts_list_is_one_line_per_expert_in_80_columns():
    demo = load_catalog(packaged_catalog_path())
    result = runner.invoke(app, ["experts", "list", "-c", str(demo.path)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.rstrip("\n").splitlines()
    rows = [line for line in lines if line.startswith("│")]
    header = ["title", "top border", "column names", "rule", "bottom border"]
    assert len(lines) == len(header) + len(demo.experts), result.stdout
    assert [row.split("│")[1].strip() for row in rows] == demo.names
    assert max(len(line) for line in lines) <= 80
    assert all(row.rstrip(" │").endswith("…") for row in rows)  # descriptions cut, not wrapped
    shown = json.loads(run("--json", "experts", "show", "shapes", "-c", demo.path).stdout)
    assert shown["description"] == demo.expert("shapes").description  # the whole text is one command away
