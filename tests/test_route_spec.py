"""One grammar for `--expert NAME[:WEIGHT]`: the route command, a prompt-file line and the Python API
give the same route, or refuse with the same message, for every spelling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mixdiff_cli.cli import app
from mixdiff_cli.core.errors import MixdiffError
from mixdiff_cli.experts.manage import add_expert, init_catalog
from mixdiff_cli.routing.route import Member, RouteSpecError, parse_member, parse_members, renormalise
from mixdiff_cli.sampling.options import GenerationOptions

runner = CliRunner()

# the spellings `a`, `a:0.5`, `a=0.5`, ... with real expert names (PEFT misreads a one-letter adapter name)
ACCEPTED = {
    "ink": [["ink", 1.0]], "ink:0.5": [["ink", 1.0]], "ink:2,pixel:6": [["ink", 0.25], ["pixel", 0.75]],
    "ink@:0.5,pixel:3@0.5:": [["ink", 0.25, [0.0, 0.5]], ["pixel", 0.75, [0.5, 1.0]]],  # timestep bands
}
REFUSED = {
    "ink=0.5": "'ink=0.5' is not an expert name",
    "ink:-1": "the weight must be a positive number",
    "ink:0": "the weight must be a positive number",
    "ink:nan": "the weight must be a positive number",
    "ink:": "the weight is not a number",
    "ink:heavy": "the weight is not a number",
    "ink:1,ink:2": "expert ink is given twice",
    "nobody": "'nobody' is not in the catalog",
    "ink@0.7:0.2": "the band's start 0.7 is not before its end 0.2",
    "ink@0.5": "the band '0.5' has no ':'",
}


@pytest.fixture(scope="module")
def catalog(tiny_sd, lora_files, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "experts.yaml"
    init_catalog(path, base=str(tiny_sd))
    add_expert(path, str(lora_files[("sd1", "diffusers")]), name="ink", prompts=["an ink drawing"])
    add_expert(path, str(lora_files[("sd1", "kohya")]), name="pixel", prompts=["pixel art"])
    return path


def by_cli_route(catalog: Path, specs: list[str]) -> tuple[list | None, str]:
    args = ["route", "a cat", "--catalog", str(catalog), "--json"] + [x for s in specs for x in ("--expert", s)]
    res = runner.invoke(app, args)
    if res.exit_code:
        assert res.exit_code in (1, 2) and len(res.stderr.strip().splitlines()) == 1, res.output  # 2: a usage error
        return None, res.stderr
    return [[c["expert"], c["weight"]] + ([c["band"]] if "band" in c else []) for c in json.loads(res.stdout)[0]["chosen"]], ""


def by_prompt_file(catalog: Path, specs: list[str], folder: Path) -> tuple[list | None, str]:
    prompts = folder / "p.txt"
    prompts.write_text("a cat " + " ".join(f"--expert {s}" for s in specs) + " --seed 1 --steps 2\n")
    res = runner.invoke(app, ["generate", "--prompts", str(prompts), "--catalog", str(catalog), "--out", str(folder / "out"), "--json"])
    if res.exit_code:
        assert res.exit_code == 1 and f"{prompts}:1:" in res.stderr, res.output
        return None, res.stderr
    [line] = (folder / "out" / "manifest.jsonl").read_text().splitlines()
    return json.loads(line)["route"], ""


def by_python(catalog: Path, specs: list[str], folder: Path) -> tuple[list | None, str]:
    from mixdiff_cli.sampling.generate import generate_images

    try:
        options = GenerationOptions(experts=tuple(specs), steps=2, seed=1)
        result = generate_images(catalog, "a cat", options, out_dir=folder / "py")
    except MixdiffError as exc:
        return None, exc.message
    return [[c["expert"], c["weight"]] + ([c["band"]] if "band" in c else []) for c in result.route["chosen"]], ""


@pytest.mark.parametrize("spelling", [*ACCEPTED, *REFUSED])
def test_every_door_gives_the_same_route_or_error(catalog, tmp_path, spelling):
    specs = spelling.split(",")
    results = [by_cli_route(catalog, specs), by_prompt_file(catalog, specs, tmp_path), by_python(catalog, specs, tmp_path)]
    if spelling in ACCEPTED:
        assert [r[0] for r in results] == [ACCEPTED[spelling]] * 3, results
    else:
        python_message = results[2][1]
        assert REFUSED[spelling] in python_message
        for route, message in results:  # the same message, word for word, through each door
            assert route is None and python_message in message, (spelling, message)


def test_parser_values():
    assert parse_member("a") == Member("a", 1.0)
    assert parse_member(" a : 0.25 ") == Member("a", 0.25)
    assert parse_member(("a", None)) == Member("a", 1.0)
    assert parse_member(["a", "3"]) == Member("a", 3.0)
    assert parse_members(["a:1", "b:3"]) == (Member("a", 1.0), Member("b", 3.0))
    for bad in ("a=0.5", "a:-1", "a:0", "a:nan", "a:inf", "a:", "", "A", ["a", True], ("a", 1, 2)):
        with pytest.raises(RouteSpecError) as info:
            parse_member(bad)
        assert info.value.exit_code == 2 and info.value.hint


def test_one_renormaliser_is_idempotent_and_rounds_once():
    once = renormalise([("a", 1.0), ("b", 1.0), ("c", 1.0)])
    assert once == [("a", 0.3334), ("b", 0.3333), ("c", 0.3333)]
    assert renormalise(once) == once
    assert renormalise([("a", 1.0), ("b", 1e-6)]) == [("a", 1.0)]  # rounds to 0: left out
