"""What a user hits in the first hour (issue 20): each test here failed on the main of 2026-12-07 and names
the item it covers."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import typer
from PIL import Image, PngImagePlugin
from typer.testing import CliRunner

from mixdiff_cli.cli import app

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()
ESC = "\x1b"


def _commands(group, path: tuple[str, ...] = ()):
    """Every leaf command of a (typer) click group, with its path of names."""
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def _flat(text: str) -> str:
    """Whitespace as one space; a line broken after a hyphen joined again (click wraps there)."""
    return re.sub(r"\s+", " ", re.sub(r"-\s+", "-", text)).strip()


def test_every_help_text_prints_as_written():
    """`generate --help` showed NAME[:WEIGHT][@START:END] as NAME[:WEIGHT] and ':END:' as an emoji (help
    read as rich markup). Every option's help of every command now appears verbatim."""
    root = typer.main.get_command(app)
    checked = 0
    for path, cmd in _commands(root):
        shown = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert shown.exit_code == 0, (path, shown.output)
        for param in cmd.params:
            if getattr(param, "param_type_name", "") == "option" and param.help and not param.hidden:
                assert _flat(param.help) in _flat(shown.output), (path, param.help)
                checked += 1
    assert checked > 100
    assert "NAME[:WEIGHT][@START:END]" in runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "200"}).output


def test_route_prints_a_prompt_with_markup_and_escapes_as_text():
    """`[/x]` in a prompt crashed `route` (rich markup), `[cat:dog:0.5]` vanished, ESC reached the terminal."""
    prompt = f"[/x] a red circle [cat:dog:0.5] {ESC}]0;owned\x07"
    from mixdiff_cli.catalog.discovery import packaged_catalog_path

    res = runner.invoke(app, ["route", prompt, "--catalog", str(packaged_catalog_path())])
    assert res.exit_code == 0, res.output
    assert "[/x] a red circle [cat:dog:0.5]" in res.stdout and ESC not in res.output and "\x07" not in res.output


def test_inspect_never_passes_terminal_escapes(tmp_path):
    """`inspect` printed a PNG's ESC/OSC sequences to the terminal as they were."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", f"a cat {ESC}]0;owned\x07 [/x] {ESC}[31mred\nSteps: 20, Seed: 1")
    Image.new("RGB", (8, 8)).save(tmp_path / "e.png", pnginfo=info)
    res = runner.invoke(app, ["inspect", str(tmp_path / "e.png")])
    assert res.exit_code == 0, res.output
    assert ESC not in res.output and "\x07" not in res.output
    assert "a cat \\x1b]0;owned\\x07 [/x] \\x1b[31mred" in res.stdout  # shown, escaped


def test_the_catalog_lock_is_ignored_by_git(tmp_path):
    """`.experts.yaml.lock` (the catalog's write lock) showed up in `git status`."""
    res = subprocess.run(["git", "check-ignore", "-q", ".experts.yaml.lock"], cwd=REPO)
    assert res.returncode == 0


def test_an_expert_name_with_a_trailing_newline_is_refused():
    """The name pattern ended in `$`, which matches before a final newline: "shapes\\n" passed."""
    from mixdiff_cli.catalog.model import check_name
    from mixdiff_cli.core.errors import MixdiffError
    from mixdiff_cli.routing.route import member

    assert check_name("shapes") == "shapes" and member("shapes").expert == "shapes"
    with pytest.raises(MixdiffError, match="invalid expert name"):
        check_name("shapes\n")
    with pytest.raises(MixdiffError, match="is not an expert name"):
        member("shapes\n")


def test_a_line_separator_inside_a_prompt_file_line_stays_in_it(tmp_path):
    """U+2028 inside a line split it into extra items with wrong line numbers, and refused valid JSONL."""
    from mixdiff_cli.sampling.prompts import parse_prompts

    (tmp_path / "p.txt").write_text("a red\u2028fox\na blue\x85cat\n", encoding="utf-8")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a red\u2028fox"}\n{"prompt": "a blue cat"}\n', encoding="utf-8")
    txt, jsonl = parse_prompts(tmp_path / "p.txt"), parse_prompts(tmp_path / "p.jsonl")
    assert [(i.line, i.prompt) for i in txt.items] == [(1, "a red\u2028fox"), (2, "a blue\x85cat")] and not txt.errors
    assert [(i.line, i.prompt) for i in jsonl.items] == [(1, "a red\u2028fox"), (2, "a blue cat")] and not jsonl.errors


def test_keep_going_does_not_suggest_keep_going(tmp_path):
    """With --keep-going the warning for a bad item still said "or pass --keep-going"."""
    from mixdiff_cli.catalog.discovery import packaged_catalog_path
    from mixdiff_cli.sampling.batch import BatchSettings, run_batch
    from mixdiff_cli.sampling.options import GenerationOptions
    from mixdiff_cli.sampling.prompts import PromptFileError

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle --steps 1\na red circle --steps many\n")
    with pytest.raises(PromptFileError) as raised:
        run_batch(packaged_catalog_path(), prompts, tmp_path / "a", GenerationOptions(steps=1))
    assert "pass --keep-going" in str(raised.value)
    result = run_batch(packaged_catalog_path(), prompts, tmp_path / "b", GenerationOptions(steps=1), BatchSettings(keep_going=True))
    assert result.failed == 1 and result.written == 1
    assert "p.txt:2" in result.errors[0] and "keep-going" not in result.errors[0], result.errors


def _router(tmp_path, triggers: dict[str, list[str]]):
    from mixdiff_cli.catalog.model import Base, Catalog, Expert
    from mixdiff_cli.catalog.schema import save_catalog
    from mixdiff_cli.routing.router import load_router

    cat = Catalog(path=tmp_path / "experts.yaml", base=Base(source="/nonexistent/base", arch="sd1"))
    prompts = {"city": ["a city street at night", "an old house"], "shapes": ["a red circle", "a blue square"]}
    for name, words in triggers.items():
        cat.experts.append(Expert(name=name, kind="lora", source=f"{name}.safetensors", format="diffusers", sha256=f"{name}-sha",
                                  prompts=prompts[name], trigger=words))
    save_catalog(cat)
    return load_router(cat.path, encoder="words")


def test_a_trigger_lower_casing_to_other_letters_is_matched_not_a_key_error(tmp_path):
    """"istanbul" and "İstanbul" in one prompt raised KeyError ("İ" lower-cases to two characters)."""
    router = _router(tmp_path, {"city": ["istanbul"], "shapes": ["ſquare"]})
    for prompt in ("istanbul and İstanbul at night", "İstanbul, istanbul", "a ſquare and a square", "a SQUARE"):
        route = router.decide(router.embed([prompt])[0], prompt, top_k=1)
        assert route.chosen, prompt
    assert router.decide(router.embed(["istanbul"])[0], "istanbul").chosen == [("city", 1.0)]


def test_a_trigger_of_function_words_forces_nothing(tmp_path):
    """A LoRA whose trigger_phrase was "a, the, on" was forced into every prompt, beyond --top-k."""
    router = _router(tmp_path, {"city": ["a", "the", "on"], "shapes": ["square"]})
    route = router.decide(router.embed(["a red circle on the table"])[0], "a red circle on the table", top_k=1)
    assert route.chosen == [("shapes", 1.0)] and not any("trigger" in why for why in route.reasons.values()), route.reasons
    assert {"a", "the", "on"} <= set(router.generic_triggers) and "square" in router.triggers


def test_two_runs_into_one_folder_with_one_seed_keep_both_images(tmp_path):
    """Data loss 1: the image number was chosen before sampling, so a run that finished meanwhile into the same
    folder with the same seed had its 00001-SEED.png overwritten (both exited 0). Here the second run runs
    to its end while the first is at its last step."""
    from mixdiff_cli.catalog.discovery import packaged_catalog_path
    from mixdiff_cli.sampling.generate import generate_images
    from mixdiff_cli.sampling.options import GenerationOptions

    out, inner = tmp_path / "out", []

    def meanwhile(done: int, total: int) -> None:
        if done == total and not inner:
            inner.append(generate_images(packaged_catalog_path(), "a red circle", GenerationOptions(seed=0, steps=2), out_dir=out))

    outer = generate_images(packaged_catalog_path(), "green and yellow checks", GenerationOptions(seed=0, steps=2), out_dir=out,
                            progress=meanwhile)
    [first], [second] = inner[0].paths, outer.paths
    assert first.name == "00001-0.png" and second.name == "00002-0.png"
    from mixdiff_cli.sampling.pngmeta import read_record

    assert read_record(first)["prompt"] == "a red circle" and read_record(second)["prompt"] == "green and yellow checks"
    assert sorted(p.name for p in out.iterdir()) == ["00001-0.png", "00002-0.png"]  # no temporary file left


def test_a_second_batch_into_a_busy_folder_is_refused(tmp_path):
    """Data loss 2: two batches started together into one folder both ran, overwrote each other's images and
    left a manifest whose hashes did not match. Here a second batch starts while the first samples its
    first image (nothing written yet)."""
    from mixdiff_cli.catalog.discovery import packaged_catalog_path
    from mixdiff_cli.core.errors import MixdiffError
    from mixdiff_cli.sampling.batch import run_batch
    from mixdiff_cli.sampling.engine import Engine
    from mixdiff_cli.sampling.options import GenerationOptions

    prompts, out, refused = tmp_path / "p.txt", tmp_path / "out", []
    prompts.write_text("a red circle\n")
    (tmp_path / "q.txt").write_text("green and yellow checks\n")
    engine = Engine(packaged_catalog_path())
    sample = engine.generate

    def meanwhile(*args, **kwargs):
        if not refused:
            with pytest.raises(MixdiffError, match="another batch is writing into") as raised:
                run_batch(packaged_catalog_path(), tmp_path / "q.txt", out, GenerationOptions(steps=2, seed=0), handle_signals_off())
            refused.append(raised.value)
        return sample(*args, **kwargs)

    engine.generate = meanwhile
    result = run_batch(packaged_catalog_path(), prompts, out, GenerationOptions(steps=2, seed=0), handle_signals_off(), engine=engine)
    assert refused and result.written == 1
    again = run_batch(packaged_catalog_path(), tmp_path / "q.txt", tmp_path / "other", GenerationOptions(steps=2, seed=0), handle_signals_off())
    assert again.written == 1 and not list(tmp_path.glob(".*.batch.lock"))  # the lock goes with its batch


def handle_signals_off():
    from mixdiff_cli.sampling.batch import BatchSettings

    return BatchSettings(handle_signals=False)


def test_a_symlinked_catalog_stays_a_link(tmp_path):
    """Data loss 5: the first write replaced a symlinked experts.yaml by a regular file (the shared catalog
    it pointed to stayed behind, unchanged)."""
    from mixdiff_cli.catalog.model import Base, Catalog
    from mixdiff_cli.catalog.schema import edit_catalog, load_catalog, save_catalog

    shared = tmp_path / "shared" / "experts.yaml"
    shared.parent.mkdir()
    save_catalog(Catalog(path=shared, base=Base(source="/nonexistent/base", arch="sd1")))
    link = tmp_path / "mine" / "experts.yaml"
    link.parent.mkdir()
    link.symlink_to(shared)
    with edit_catalog(link) as cat:
        cat.base = Base(source="/another/base", arch="sd1")
    assert link.is_symlink() and link.resolve() == shared.resolve()
    assert load_catalog(shared).base.source == "/another/base"


def test_router_files_keep_the_mode_other_users_can_read(tmp_path):
    """Router files became 0600 after `router train` / `add-expert` (safetensors writes its file 0600),
    locking other users of a shared catalog out."""
    import os

    import torch
    from safetensors.torch import save_file

    from mixdiff_cli.core.fsutil import atomic_path

    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "router.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))
        assert (tmp_path / "router.safetensors").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)


def test_router_train_never_overwrites_a_file_that_is_not_a_router(tmp_path):
    """Data loss 4: `router train --output PATH` overwrote anything: a registered LoRA, the base UNet, experts.yaml."""
    import sys

    sys.path.insert(0, str(REPO / "tests"))
    from test_router import write_catalog

    catalog = write_catalog(tmp_path)
    lora = tmp_path / "animals.safetensors"
    lora.write_bytes(b"not yours to overwrite")
    for victim in (lora, catalog):
        before = victim.read_bytes()
        res = runner.invoke(app, ["router", "train", "--catalog", str(catalog), "--encoder", "words", "--output", str(victim)])
        assert res.exit_code == 1 and "exists and is not a router checkpoint" in res.output, res.output
        assert victim.read_bytes() == before
    ok = runner.invoke(app, ["router", "train", "--catalog", str(catalog), "--encoder", "words", "--output", str(tmp_path / "r.safetensors")])
    assert ok.exit_code == 0, ok.output
    again = runner.invoke(app, ["router", "train", "--catalog", str(catalog), "--encoder", "words", "--output", str(tmp_path / "r.safetensors")])
    assert again.exit_code == 0, again.output  # a router checkpoint is retrained in place


@pytest.mark.parametrize(("args", "message"), [
    (["--height", "100000"], "--height 100000 is over 8192 pixels"),
    (["-g", "1e308"], "--guidance must be a number from 0 to 100"),
    (["--steps", "5000"], "--steps must be 1 to 1000"),
])
def test_sizes_steps_and_guidance_have_upper_bounds(args, message, tmp_path):
    """13: `--height 100000` hung through two SIGTERMs, `-g 1e308` gave a black PNG with exit 0."""
    from mixdiff_cli.catalog.discovery import packaged_catalog_path

    res = runner.invoke(app, ["generate", "a red circle", *args, "--catalog", str(packaged_catalog_path()), "--out", str(tmp_path)])
    assert res.exit_code == 2 and message in res.output, res.output
    assert not list(tmp_path.glob("*.png"))


def test_prompt_file_values_out_of_range_are_bad_items_of_the_file(tmp_path):
    """13: prompt-file steps 1,001-10,000 aborted the batch despite --keep-going; `guidance: Infinity` was
    refused only after the model loaded, blaming --guidance."""
    from mixdiff_cli.catalog.discovery import packaged_catalog_path
    from mixdiff_cli.sampling.batch import BatchSettings, run_batch
    from mixdiff_cli.sampling.options import GenerationOptions

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red circle", "steps": 2}\n{"prompt": "a red circle", "steps": 5000}\n'
                       '{"prompt": "a red circle", "guidance": Infinity}\n{"prompt": "a red circle", "height": 100000}\n')
    result = run_batch(packaged_catalog_path(), prompts, tmp_path / "out", GenerationOptions(steps=2, seed=0), BatchSettings(keep_going=True))
    assert result.written == 1 and result.failed == 3, result.errors
    assert [e.split(": ", 1)[0].rsplit(":", 1)[1] for e in result.errors] == ["2", "3", "4"] and not any("--" in e for e in result.errors)


def test_a_lora_of_nans_is_an_error_not_a_black_image(tiny_sd, tmp_path):
    """12: NaN weights gave an all-black PNG with exit 0."""
    from safetensors.torch import load_file, save_file

    from mixdiff_cli.testing import make_lora

    lora = make_lora(tiny_sd, tmp_path / "nan.safetensors", seed=1)
    save_file({k: v * float("nan") for k, v in load_file(lora).items()}, lora)
    catalog = tmp_path / "experts.yaml"
    assert runner.invoke(app, ["init", "--base", str(tiny_sd), "--catalog", str(catalog)]).exit_code == 0
    added = runner.invoke(app, ["add-expert", str(lora), "--catalog", str(catalog), "--name", "nan"])
    assert added.exit_code == 0, added.output
    res = runner.invoke(app, ["generate", "a cat", "-e", "nan", "--steps", "2", "--catalog", str(catalog), "--out", str(tmp_path / "out")])
    assert res.exit_code == 1 and "sampling went to NaN or Inf at step 1 of 2" in res.output, res.output
    assert not list((tmp_path / "out").glob("*.png"))


def test_the_readme_bands_auto_example_runs(tmp_path):
    """`generate "a harbour at dusk" --top-k 2 --bands auto` (README) exited 2: the second expert's share was
    under one step. A sliver the user did not type is left out, and the route says so."""
    import json

    from mixdiff_cli.catalog.discovery import packaged_catalog_path

    demo = str(packaged_catalog_path())
    res = runner.invoke(app, ["--json", "generate", "a harbour at dusk", "--top-k", "2", "--bands", "auto", "--steps", "8",
                              "--catalog", demo, "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    route = json.loads(res.stdout)["route"]  # no demo expert is for harbours: the bare base, and why
    assert route["chosen"] == [] and route["abstention"]["abstained"] and route["abstention"]["reason"].endswith(": bare base")
    # glyphs' share (0.066 of this route) passes the router's floor but holds no step of 8
    res = runner.invoke(app, ["--json", "generate", "there is a blue disk placed upon white paper", "--top-k", "2", "--bands", "auto",
                              "--steps", "8", "--catalog", demo, "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    route = json.loads(res.stdout)["route"]
    assert [c["expert"] for c in route["chosen"]] == ["shapes"]
    assert "left out: its share holds no step of the 8-step run" in route["reasons"]["glyphs"]


def _demo_catalog_copy(tmp_path):
    """The repository-root view of the demo (its router is the packaged demo's, which mixdiff never writes)."""
    text = (REPO / "experts.yaml").read_text().replace("mixdiff_cli/data/demo/", f"{REPO}/mixdiff_cli/data/demo/")
    (tmp_path / "experts.yaml").write_text(text)
    return tmp_path / "experts.yaml"


def _add_without_router(catalog, name: str, prompts: list[str]):
    """The catalog write of add-expert alone: the kill point before its router write."""
    import dataclasses

    from mixdiff_cli.catalog.schema import edit_catalog

    with edit_catalog(catalog) as cat:
        cat.experts.append(dataclasses.replace(cat.experts[0], name=name, prompts=prompts, trigger=[], description=None,
                                               sha256="0" * 64))


def test_a_router_one_write_behind_the_catalog_still_routes(tmp_path):
    """6: add-expert wrote the catalog, then the router; a kill between the two (or a router the user cannot
    write, as in the repository root) left every `route` and `generate` failing ("router ... lacks")."""
    import json
    import sys

    sys.path.insert(0, str(REPO / "tests"))
    from test_router import write_catalog

    from mixdiff_cli.routing.checkpoint import read_checkpoint
    from mixdiff_cli.routing.router import load_router

    # a catalog of the user's: the next route brings the router in step, on disk too
    catalog = write_catalog(tmp_path / "mine")
    assert runner.invoke(app, ["router", "train", "--catalog", str(catalog), "--encoder", "words"]).exit_code == 0
    _add_without_router(catalog, "dragons", ["a purple dragon over a castle", "a dragon breathing fire"])
    res = runner.invoke(app, ["--json", "route", "a purple dragon over a castle", "--catalog", str(catalog)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)[0]["chosen"][0]["expert"] == "dragons"
    assert "dragons" in [e["name"] for e in read_checkpoint(tmp_path / "mine" / "router.safetensors").experts]
    # the repository root's view of the demo: the packaged router stays as it is, routing works with a warning
    demo = _demo_catalog_copy(tmp_path)
    _add_without_router(demo, "dragons", ["a purple dragon over a castle", "a dragon breathing fire"])
    router = load_router(demo)
    assert "dragons" in router.names and "lacks the change to dragons" in router.warnings[0]
    res = runner.invoke(app, ["route", "a purple dragon over a castle", "--catalog", str(demo)])
    assert res.exit_code == 0 and "dragons" in res.stdout, res.output


def test_prompt_file_lines_take_the_short_flags_generate_takes(tmp_path):
    """A line `a blue square -n blurry --seed 8` kept "-n blurry" inside the prompt."""
    from mixdiff_cli.sampling.prompts import parse_prompts

    (tmp_path / "p.txt").write_text("a blue square -n blurry --seed 8\na red circle -g 5 -W 128 -H 64 -e shapes:0.5\n"
                                    "a well-lit room\na cat -N 4\n")
    parsed = parse_prompts(tmp_path / "p.txt")
    first, second, third = parsed.items
    assert (first.prompt, first.negative, first.seed) == ("a blue square", "blurry", 8)
    assert (second.guidance, second.width, second.height, second.experts) == (5.0, 128, 64, (("shapes", 0.5),))
    assert third.prompt == "a well-lit room"  # a hyphen inside a word is text
    assert "-N (--num-images) applies to the whole run" in str(parsed.errors[0])


def test_init_then_init_base_sets_the_base(tmp_path):
    """`init` without --base wrote `base: null`, then refused a second `init --base`."""
    from mixdiff_cli.catalog.schema import load_catalog

    catalog = tmp_path / "experts.yaml"
    assert runner.invoke(app, ["init", "--catalog", str(catalog)]).exit_code == 0
    res = runner.invoke(app, ["init", "--base", str(REPO / "mixdiff_cli/data/demo/base"), "--catalog", str(catalog)])
    assert res.exit_code == 0, res.output
    assert load_catalog(catalog).base.arch == "sd1"
    again = runner.invoke(app, ["init", "--base", str(REPO / "mixdiff_cli/data/demo/base"), "--catalog", str(catalog)])
    assert again.exit_code == 1 and "already exists" in again.output  # a catalog with a base is not replaced


def test_init_with_the_demo_base_keeps_its_guidance(tmp_path):
    """`init --base <demo base>` dropped the demo's `guidance: 3.0`."""
    from mixdiff_cli.catalog.schema import load_catalog

    catalog = tmp_path / "experts.yaml"
    assert runner.invoke(app, ["init", "--base", str(REPO / "mixdiff_cli/data/demo/base"), "--catalog", str(catalog)]).exit_code == 0
    assert load_catalog(catalog).base.guidance == 3.0


def test_init_from_demo_starts_a_personal_catalog_that_keeps_routing(tmp_path):
    """There was no way to start a catalog of one's own from the demo; add-expert in the repository root
    wrote the tracked experts.yaml and every later route failed."""
    import json

    from mixdiff_cli.catalog.discovery import packaged_catalog_path
    from mixdiff_cli.catalog.headers import sha256_file
    from mixdiff_cli.catalog.schema import load_catalog
    from mixdiff_cli.testing import make_lora

    demo = load_catalog(packaged_catalog_path())
    packaged_router = sha256_file(demo.router_path())
    catalog = tmp_path / "mine" / "experts.yaml"
    res = runner.invoke(app, ["init", "--from-demo", "--catalog", str(catalog)])
    assert res.exit_code == 0, res.output
    mine = load_catalog(catalog)
    assert mine.names == demo.names and mine.base.guidance == demo.base.guidance
    assert [e.prompts for e in mine.experts] == [e.prompts for e in demo.experts] and [e.description for e in mine.experts] == [e.description for e in demo.experts]
    lora = make_lora(REPO / "mixdiff_cli/data/demo/base", tmp_path / "dragons.safetensors", seed=3)
    added = runner.invoke(app, ["add-expert", str(lora), "--catalog", str(catalog), "--prompt", "a purple dragon over a castle"])
    assert added.exit_code == 0 and "warning" not in added.output, added.output
    res = runner.invoke(app, ["--json", "route", "a purple dragon over a castle", "--catalog", str(catalog)])
    assert res.exit_code == 0 and json.loads(res.stdout)[0]["chosen"][0]["expert"] == "dragons", res.output
    assert sha256_file(demo.router_path()) == packaged_router  # the packaged demo is never written


def test_a_dry_run_table_says_would_add(tmp_path):
    """`add-expert --dry-run` tables said "added" for files it did not add."""
    from mixdiff_cli.catalog.schema import load_catalog
    from mixdiff_cli.testing import make_lora

    catalog = tmp_path / "experts.yaml"
    assert runner.invoke(app, ["init", "--base", str(REPO / "mixdiff_cli/data/demo/base"), "--catalog", str(catalog)]).exit_code == 0
    folder = tmp_path / "loras"
    for i in range(2):
        make_lora(REPO / "mixdiff_cli/data/demo/base", folder / f"style{i}.safetensors", seed=i)
    res = runner.invoke(app, ["add-expert", str(folder), "--catalog", str(catalog), "--dry-run"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    rows = [line for line in res.stdout.splitlines() if "style" in line]
    assert len(rows) == 2 and all("would add" in row and " added " not in row for row in rows), res.stdout
    assert not load_catalog(catalog).experts


def test_an_interrupted_batch_says_how_many_are_left_and_how_to_finish(tmp_path, monkeypatch):
    """Ctrl-C in a batch printed "1 written, 0 skipped, 0 failed" and exited 130, without saying that the rest
    was left or how to finish it. The run signals itself after its first image (deterministic)."""
    import os
    import signal

    from mixdiff_cli.catalog.discovery import packaged_catalog_path
    from mixdiff_cli.sampling import batch

    run_batch = batch.run_batch

    def interrupted_after_one(*args, on_image=None, **kwargs):
        def hook(record, done, total):
            if done == 1:
                os.kill(os.getpid(), signal.SIGINT)
            if on_image is not None:
                on_image(record, done, total)

        return run_batch(*args, on_image=hook, **kwargs)

    monkeypatch.setattr(batch, "run_batch", interrupted_after_one)
    (tmp_path / "p.txt").write_text("a red circle\ngreen and yellow checks\na landscape at night\n")
    res = runner.invoke(app, ["generate", "--prompts", str(tmp_path / "p.txt"), "--steps", "2", "--seed", "0",
                              "--catalog", str(packaged_catalog_path()), "--out", str(tmp_path / "out")])
    assert res.exit_code == 130, res.output
    assert "interrupted: 2 left; rerun the same command with --resume to finish" in res.output


def test_copying_two_peft_adapters_keeps_each_its_own_config(tiny_sd, tmp_path):
    """Data loss 3: `add-expert --copy` of a second PEFT adapter wrote its adapter_config.json over the
    first one's; the first expert's images changed (alpha 4 -> 400) while `verify` passed."""
    import json

    from mixdiff_cli.catalog.schema import load_catalog
    from mixdiff_cli.testing import make_lora

    catalog = tmp_path / "experts.yaml"
    assert runner.invoke(app, ["init", "--base", str(tiny_sd), "--catalog", str(catalog)]).exit_code == 0
    for name, alpha in (("four", 4.0), ("many", 400.0)):
        folder = make_lora(tiny_sd, tmp_path / "src" / name, "peft", alpha=alpha, seed=int(alpha))
        res = runner.invoke(app, ["add-expert", str(folder / "adapter_model.safetensors"), "--catalog", str(catalog), "--name", name, "--copy"])
        assert res.exit_code == 0, res.output
    cat = load_catalog(catalog)
    for name, alpha in (("four", 4.0), ("many", 400.0)):
        config = cat.resolve(cat.expert(name).source).parent / "adapter_config.json"
        assert json.loads(config.read_text())["lora_alpha"] == alpha, name
    assert runner.invoke(app, ["experts", "verify", "--catalog", str(catalog)]).exit_code == 0


def test_a_swapped_expert_file_is_refused_not_used(tiny_sd, tmp_path):
    """9: generate never checked an expert file against its recorded sha256: a swapped file was used
    silently and the PNG recorded the old hash."""
    from mixdiff_cli.testing import make_lora

    catalog = tmp_path / "experts.yaml"
    lora = make_lora(tiny_sd, tmp_path / "style.safetensors", seed=1)
    assert runner.invoke(app, ["init", "--base", str(tiny_sd), "--catalog", str(catalog)]).exit_code == 0
    assert runner.invoke(app, ["add-expert", str(lora), "--catalog", str(catalog), "--name", "style"]).exit_code == 0
    args = ["generate", "a cat", "-e", "style", "--steps", "2", "--seed", "1", "--catalog", str(catalog)]
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "a")]).exit_code == 0
    make_lora(tiny_sd, lora, seed=2)  # another file under the same name
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "b")])
    assert res.exit_code == 1 and "is not the file the catalog recorded" in res.output, res.output
    assert not list((tmp_path / "b").glob("*.png"))


NO_TORCH = """
import atexit, sys
atexit.register(lambda: sys.stderr.write("\\ntorch imported: " + str("torch" in sys.modules) + "\\n"))
from mixdiff_cli.cli import main
sys.argv = ["mixdiff", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize(("args", "code", "message"), [
    (["generate", "-r", "0:1=a cat"], 2, "the box '0:1' is not x0:x1,y0:y1"),
    (["generate", "a cat", "-e", "shapes@0.99:1"], 2, "holds no step of the 30-step run"),
    (["generate", "--prompts", "{tmp}/p.txt"], 1, "unknown option --size"),
])
def test_usage_errors_come_before_torch_is_imported(args, code, message, tmp_path):
    """Usage errors arrived after 7-8 s of imports and model loads: a bad -r box, a band sliver, an unknown
    prompt-file option. They are found before torch is imported (measured: 0.6-0.7 s a command)."""
    import subprocess
    import sys

    (tmp_path / "p.txt").write_text("a cat --size 3\n")
    from mixdiff_cli.catalog.discovery import packaged_catalog_path

    argv = [a.replace("{tmp}", str(tmp_path)) for a in args] + ["--catalog", str(packaged_catalog_path()), "--out", str(tmp_path / "o")]
    res = subprocess.run([sys.executable, "-c", NO_TORCH, *argv], capture_output=True, text=True, timeout=120)
    assert res.returncode == code and message in res.stderr, res.stderr
    assert "torch imported: False" in res.stderr


def test_a_fifo_in_a_lora_folder_is_skipped_not_waited_on(tmp_path):
    """14: a FIFO named x.safetensors in a LoRA folder hung add-expert, even with --dry-run."""
    import os

    from mixdiff_cli.testing import make_lora

    catalog = tmp_path / "experts.yaml"
    assert runner.invoke(app, ["init", "--base", str(REPO / "mixdiff_cli/data/demo/base"), "--catalog", str(catalog)]).exit_code == 0
    folder = tmp_path / "loras"
    make_lora(REPO / "mixdiff_cli/data/demo/base", folder / "style.safetensors", seed=1)
    os.mkfifo(folder / "x.safetensors")
    res = runner.invoke(app, ["add-expert", str(folder), "--catalog", str(catalog), "--dry-run"])
    assert res.exit_code == 0 and "would add 1" in res.output, res.output
    single = runner.invoke(app, ["add-expert", str(folder / "x.safetensors"), "--catalog", str(catalog)])
    assert single.exit_code == 1 and "is not a regular file" in single.output, single.output


def test_integer_lora_weights_are_refused_when_added(tmp_path):
    """17: I8/BOOL LoRA tensors were accepted at add-expert and failed at generate with 47 kB of loader errors."""
    from safetensors.torch import load_file, save_file

    from mixdiff_cli.testing import make_lora

    catalog = tmp_path / "experts.yaml"
    assert runner.invoke(app, ["init", "--base", str(REPO / "mixdiff_cli/data/demo/base"), "--catalog", str(catalog)]).exit_code == 0
    lora = make_lora(REPO / "mixdiff_cli/data/demo/base", tmp_path / "int.safetensors", seed=1)
    save_file({k: (v * 100).to(dtype=__import__("torch").int8) for k, v in load_file(lora).items()}, lora)
    res = runner.invoke(app, ["add-expert", str(lora), "--catalog", str(catalog)])
    assert res.exit_code == 1 and "holds I8 tensors; LoRA weights are floating point" in res.output, res.output


def test_router_train_after_add_keeps_the_encoder_and_prints_no_tokenizer_noise(tmp_path):
    """`router train` after add-expert switched the demo's words encoder to base (and its 64-unit gate to a
    linear one), and printed about 6 kB of tokenizer warnings for texts past the encoder's 16 tokens."""
    from mixdiff_cli.routing.checkpoint import read_checkpoint
    from mixdiff_cli.testing import make_lora

    catalog = tmp_path / "mine" / "experts.yaml"
    assert runner.invoke(app, ["init", "--from-demo", "--catalog", str(catalog)]).exit_code == 0
    lora = make_lora(REPO / "mixdiff_cli/data/demo/base", tmp_path / "dragons.safetensors", seed=3)
    long_prompt = "a purple dragon with wide wings over a grey castle on a hill under a stormy evening sky full of clouds"
    assert runner.invoke(app, ["add-expert", str(lora), "--catalog", str(catalog), "--prompt", long_prompt]).exit_code == 0
    router = tmp_path / "mine" / "router.safetensors"
    before = read_checkpoint(router)
    assert (before.encoder, before.gate.hidden) == ("words", 64)
    res = runner.invoke(app, ["router", "train", "--catalog", str(catalog), "--epochs", "20"])
    assert res.exit_code == 0, res.output
    after = read_checkpoint(router)
    assert (after.encoder, after.gate.hidden) == ("words", 64) and "dragons" in after.names
    res = runner.invoke(app, ["router", "train", "--catalog", str(catalog), "--epochs", "20", "--encoder", "base"])
    assert res.exit_code == 0, res.output
    assert len(res.stderr) < 400 and "Token indices" not in res.stderr and "truncated" not in res.stderr, res.stderr
    assert read_checkpoint(router).encoder == "base"
    res = runner.invoke(app, ["router", "train", "--catalog", str(catalog), "--epochs", "20", "--hidden", "0"])
    assert res.exit_code == 0 and (read_checkpoint(router).encoder, read_checkpoint(router).gate.hidden) == ("base", 0)


def _aliased_catalog(path: Path, experts: int, prompts: int) -> Path:
    """A catalog whose experts all share one anchored prompt list (`prompts: *p`)."""
    shared = "[" + ", ".join(f'"shared prompt number {i} of a long list"' for i in range(prompts)) + "]"
    items = [f"- name: e{i}\n  kind: lora\n  source: e{i}.safetensors\n  format: diffusers\n  prompts: {f'&p {shared}' if i == 0 else '*p'}"
             for i in range(experts)]
    path.write_text("version: 1\nbase: null\nexperts:\n" + "\n".join(items) + "\n")
    return path


def test_a_catalog_of_yaml_aliases_is_refused_before_it_expands(tmp_path):
    """11: a 183 KB catalog of YAML anchors expanded to a 79 MB cache in 13 s."""
    from mixdiff_cli.catalog.schema import load_catalog

    bomb = _aliased_catalog(tmp_path / "bomb.yaml", 1500, 1500)  # 140 KB of text, 60 MB of prompts expanded
    assert bomb.stat().st_size < 200_000
    res = runner.invoke(app, ["experts", "list", "--catalog", str(bomb)])
    assert res.exit_code == 1 and "aliases (*name) expand to far more than the file holds" in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1
    fair = load_catalog(_aliased_catalog(tmp_path / "fair.yaml", 20, 30))  # aliases used as meant still load
    assert len(fair.experts) == 20 and all(len(e.prompts) == 30 for e in fair.experts)


@pytest.mark.parametrize(("name", "text"), [
    ("deep.jsonl", '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n"),
    ("deep.yaml", "- prompt: " + "[" * 100_000 + "]" * 100_000 + "\n"),
    ("deep-item.yaml", "- a red fox\n- " + "[" * 2_000 + "]" * 2_000 + "\n"),
])
def test_a_deeply_nested_prompt_file_is_a_bad_item_not_a_crash(tmp_path, name, text):
    """18: deep JSONL/YAML prompt files ended in "unexpected RecursionError ... report it"."""
    path = tmp_path / name
    path.write_text(text)
    res = runner.invoke(app, ["generate", "--prompts", str(path), "--catalog", str(_demo_catalog_copy(tmp_path)), "--out", str(tmp_path / "o")])
    assert res.exit_code in (1, 2) and "values nested too deeply to read" in res.stderr and "unexpected" not in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1


def test_a_csv_cell_past_the_csv_module_limit_is_read(tmp_path):
    """18: a CSV field over 131,072 characters ended in "unexpected Error: field larger than field limit"."""
    from mixdiff_cli.sampling.prompts import parse_prompts

    (tmp_path / "p.csv").write_text("prompt,seed\n" + "a red fox " * 15_000 + ",3\na cat,4\n")
    parsed = parse_prompts(tmp_path / "p.csv")
    assert not parsed.errors and [len(i.prompt) for i in parsed.items] == [149_999, 5] and parsed.items[1].seed == 4


@pytest.mark.parametrize(("key", "value", "message"), [
    ("seed", None, "seed is missing"),
    ("seed", {"a": 1}, 'seed is dict {"a": 1}, not a whole number'),
    ("seed", 3.5, "seed is float 3.5, not a whole number"),
    ("steps", True, "steps is bool true, not a whole number"),
    ("experts", [{"name": 3, "weight": 1}], "expert 1's name is 3, not text"),
])
def test_a_from_png_with_an_edited_record_is_refused_in_one_line(tmp_path, key, value, message):
    """18: `--from` PNGs whose seed is missing, a dict or a float ended in "unexpected ... report it"."""
    import json

    record = {"format": "mixdiff/1", "prompt": "a red fox", "negative": None, "seed": 1, "steps": 2, "guidance": 3.0,
              "width": 64, "height": 64, "scheduler": "ddim", "experts": []}
    if value is None:
        del record[key]
    else:
        record[key] = value
    info = PngImagePlugin.PngInfo()
    info.add_text("mixdiff", json.dumps(record))
    Image.new("RGB", (8, 8)).save(tmp_path / "edited.png", pnginfo=info)
    res = runner.invoke(app, ["generate", "--from", str(tmp_path / "edited.png"), "--catalog", str(_demo_catalog_copy(tmp_path)),
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and f"the mixdiff record's {message}" in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("shape", [[0], [2]])
def test_a_kohya_alpha_that_is_not_one_number_is_refused(tmp_path, shape):
    """18: an alpha of shape [0] ended in "unexpected error ... report it" at add-expert."""
    import torch
    from safetensors.torch import load_file, save_file

    from mixdiff_cli.testing import make_lora

    lora = make_lora(REPO / "mixdiff_cli/data/demo/base", tmp_path / "k.safetensors", fmt="kohya", seed=3)
    tensors = {k: (torch.ones(shape) if k.endswith(".alpha") else v) for k, v in load_file(lora).items()}
    save_file(tensors, lora)
    res = runner.invoke(app, ["add-expert", str(lora), "--catalog", str(_demo_catalog_copy(tmp_path))])
    assert res.exit_code == 1 and f"has shape {shape}; an alpha is one number" in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1


def test_a_full_disk_names_the_file_it_could_not_write(tmp_path, monkeypatch):
    """18: disk-full errors named no path ("error: No space left on device. Check the path")."""
    import errno
    import os

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # where a full disk shows on a real filesystem

    monkeypatch.setattr(os, "fsync", full)
    catalog = tmp_path / "mine" / "experts.yaml"
    res = runner.invoke(app, ["init", "--catalog", str(catalog)])
    assert res.exit_code == 1, res.output
    assert res.stderr.strip() == f"error: cannot write {catalog}: No space left on device. Free space on that disk, or write somewhere else"
    assert [p.name for p in catalog.parent.iterdir()] == [".experts.yaml.lock"]  # nothing half-written left behind


def test_one_warning_one_hint_and_routing_warnings_look_alike(tmp_path):
    """18: a hint was printed twice ("... or pass --catalog PATH. Run 'mixdiff router train'"), and generate
    printed the router's warning without "warning:"."""
    from mixdiff_cli.testing import make_lora

    demo = _demo_catalog_copy(tmp_path)
    lora = make_lora(REPO / "mixdiff_cli/data/demo/base", tmp_path / "dragons.safetensors", seed=3)
    res = runner.invoke(app, ["add-expert", str(lora), "--catalog", str(demo), "--prompt", "a purple dragon"])
    assert res.exit_code == 0, res.output
    (warning,) = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert warning.count("Run '") == 1 and "mixdiff init --from-demo" in warning, warning
    for args in (["route", "a purple dragon"], ["generate", "a purple dragon", "--steps", "1", "--out", str(tmp_path / "o")]):
        res = runner.invoke(app, [*args, "--catalog", str(demo)])
        assert res.exit_code == 0, res.output
        said = [line for line in res.stderr.splitlines() if "lacks the change to dragons" in line]
        assert len(said) == 1 and said[0].startswith("warning: ") and said[0].count("Run '") == 1, res.stderr


def test_a_closed_stdout_is_an_error_not_lost_output(tmp_path):
    """18: with stdout closed (`>&-`), commands exited 0 and lost their output."""
    import shlex
    import sys

    command = f"{shlex.quote(sys.executable)} -m mixdiff_cli experts list --catalog {shlex.quote(str(_demo_catalog_copy(tmp_path)))} >&-"
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.startswith("error: stdout is closed"), proc.stderr


@pytest.mark.parametrize("args", [
    ["a red circle", "--expert", "shapes"],
    ["", "-r", "0:1,0:0.5=a red circle --expert shapes", "-r", "0:1,0.5:1=blue and green stripes --expert stripes"],
])
def test_a_generate_that_fails_leaves_no_empty_output_folder(tmp_path, args):
    """18: a failed `generate` left an empty out dir (here: a route over --max-memory, refused after the base loads)."""
    out_dir = tmp_path / "renders" / "today"
    res = runner.invoke(app, ["generate", *args, "--max-memory", "1", "--steps", "1", "--catalog", str(_demo_catalog_copy(tmp_path)),
                              "--out", str(out_dir)])
    assert res.exit_code == 1 and "more than --max-memory" in res.stderr, res.output
    assert not (tmp_path / "renders").exists()


def test_four_parallel_adds_leave_the_catalog_and_router_in_step(tmp_path):
    """6: four `add-expert` runs at once left a stale router, and every later route failed."""
    import json
    import sys

    from mixdiff_cli.catalog.schema import load_catalog
    from mixdiff_cli.routing.checkpoint import read_checkpoint
    from mixdiff_cli.testing import make_lora

    catalog = tmp_path / "mine" / "experts.yaml"
    assert runner.invoke(app, ["init", "--from-demo", "--catalog", str(catalog)]).exit_code == 0
    prompts = {"dragons": "a purple dragon over a castle", "ships": "a sailing ship on a stormy sea",
               "robots": "a chrome robot in a factory", "owls": "a snowy owl on a branch"}
    procs = [subprocess.Popen([sys.executable, "-m", "mixdiff_cli", "add-expert",
                               str(make_lora(REPO / "mixdiff_cli/data/demo/base", tmp_path / f"{name}.safetensors", seed=i)),
                               "--catalog", str(catalog), "--prompt", prompt], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, (name, prompt) in enumerate(prompts.items())]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert set(prompts) <= set(load_catalog(catalog).names) and len(load_catalog(catalog).experts) == 8
    assert set(prompts) <= set(read_checkpoint(tmp_path / "mine" / "router.safetensors").names)  # every row written
    res = runner.invoke(app, ["--json", "route", *prompts.values(), "--catalog", str(catalog)])
    assert res.exit_code == 0 and "warning" not in res.stderr, res.output
    assert [r["chosen"][0]["expert"] for r in json.loads(res.stdout)] == list(prompts)


def test_a_router_write_after_two_catalog_writes_takes_both_rows(tmp_path):
    """6, deterministically: two adds wrote the catalog, then the first one's router write came; it refused
    ("already out of date") and the second add's row was lost."""
    import sys

    sys.path.insert(0, str(REPO / "tests"))
    from test_router import write_catalog

    from mixdiff_cli.catalog.schema import load_catalog
    from mixdiff_cli.routing.checkpoint import read_checkpoint
    from mixdiff_cli.routing.sync import extend_router

    catalog = write_catalog(tmp_path / "mine")
    assert runner.invoke(app, ["router", "train", "--catalog", str(catalog), "--encoder", "words"]).exit_code == 0
    _add_without_router(catalog, "dragons", ["a purple dragon over a castle"])
    _add_without_router(catalog, "ships", ["a sailing ship on a stormy sea"])
    extend_router(load_catalog(catalog), "dragons")  # the first add's router write, after both catalog writes
    assert {"dragons", "ships"} <= set(read_checkpoint(tmp_path / "mine" / "router.safetensors").names)
    extend_router(load_catalog(catalog), "ships")  # the second's: already done
