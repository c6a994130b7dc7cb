"""Batch runs on the tiny SD fixture (CPU, float32): grouping by route, batch-size and order
independence, resume after a real kill, two processes under torchrun, and bad input."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mixdiff_cli.sampling.batch import BatchSettings, run_batch
from mixdiff_cli.sampling.manifest import BatchError, read_manifest
from mixdiff_cli.sampling.invariant import batch_invariant
from mixdiff_cli.sampling.options import GenerationOptions
from mixdiff_cli.core.errors import OutputError
from mixdiff_cli.sampling.prompts import PromptFileError

COLORS = {"reds": "red", "blues": "blue", "greens": "green"}
THINGS = ["cat", "dog", "tree", "house", "car", "bird", "star", "circle"]
STEPS = 2
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def batch_catalog(tiny_sd, tmp_path_factory) -> Path:
    """A catalog of three LoRA experts on tiny_sd; each prompt's colour word triggers one of them."""
    from mixdiff_cli.experts.manage import add_expert, init_catalog
    from mixdiff_cli.testing import make_lora

    root = tmp_path_factory.mktemp("batch-catalog")
    path = root / "experts.yaml"
    init_catalog(path, base=str(tiny_sd))
    for seed, (name, word) in enumerate(COLORS.items(), start=100):
        lora = make_lora(tiny_sd, root / f"{name}.safetensors", seed=seed, scale=0.02)
        add_expert(path, str(lora), name=name, prompts=[f"a {word} thing"], trigger=[word])
    return path


def prompt_lines(n: int = 24) -> list[str]:
    lines = [f"a {word} {thing}" for thing in THINGS for word in COLORS.values()]
    return lines[:n]


def write_prompts(path: Path, lines: list[str]) -> Path:
    path.write_text("# batch test\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def manifest(out: Path) -> dict[str, dict]:
    records = read_manifest(out / "manifest.jsonl")
    assert len(records) == len({r["id"] for r in records}), "one manifest line per item"
    return {r["id"]: r for r in records}


def engine_for(catalog: Path, max_loaded: int = 4):
    from mixdiff_cli.sampling.engine import Engine

    return Engine(catalog, device="cpu", max_loaded=max_loaded)


def test_groups_by_route_and_images_do_not_depend_on_batch_size_or_order(batch_catalog, tmp_path):
    from PIL import Image

    lines = prompt_lines(24)
    prompts = write_prompts(tmp_path / "p.txt", lines)
    engine = engine_for(batch_catalog, max_loaded=1)  # any revisit of an expert set would reload it
    calls: list[tuple] = []
    generate = engine.generate

    def spy(requests, route=(), *args, **kwargs):
        calls.append((len(requests), tuple(route.chosen)))
        return generate(requests, route, *args, **kwargs)

    engine.generate = spy
    one = run_batch(batch_catalog, prompts, tmp_path / "bs1", GenerationOptions(batch_size=1, seed=5, steps=STEPS), engine=engine)
    assert (one.written, one.failed, one.exit_code) == (24, 0, 0)
    assert sorted(engine.loads) == ["blues", "greens", "reds"]  # each expert set activated once
    assert len(calls) == 24

    engine.loads.clear()
    calls.clear()
    four = run_batch(batch_catalog, prompts, tmp_path / "bs4", GenerationOptions(batch_size=4, seed=5, steps=STEPS), engine=engine)
    assert four.written == 24
    assert len(calls) == 6 and all(n == 4 for n, _ in calls)  # 3 routes x 8 prompts in batches of 4
    switches = sum(calls[i][1] != calls[i - 1][1] for i in range(1, len(calls)))
    assert switches == 2 and len(engine.loads) == 3  # one contiguous run per route set
    assert {r for _, r in calls} == {(("reds", 1.0),), (("blues", 1.0),), (("greens", 1.0),)}

    m1, m4 = manifest(tmp_path / "bs1"), manifest(tmp_path / "bs4")
    assert len(m1) == 24 and m1.keys() == m4.keys()
    assert [m1[k]["sha256"] for k in m1] == [m4[k]["sha256"] for k in m1]  # identical files, metadata included
    assert len({r["sha256"] for r in m1.values()}) == 24
    assert {r["seed"] for r in m1.values()} == set(range(5, 29))  # base seed + item index

    # shuffled order (seeds pinned to the same values) and a different batch size: the same images
    order = list(range(24))
    random.Random(0).shuffle(order)
    shuffled = write_prompts(tmp_path / "s.txt", [f"{lines[i]} --seed {5 + i}" for i in order])
    run_batch(batch_catalog, shuffled, tmp_path / "shuf", GenerationOptions(batch_size=3, seed=99, steps=STEPS), engine=engine)
    ms = manifest(tmp_path / "shuf")
    by_prompt = {r["prompt"]: r for r in m1.values()}
    for record in ms.values():
        ref = by_prompt[record["prompt"]]
        assert record["seed"] == ref["seed"]
        a = Image.open(tmp_path / "shuf" / record["path"])
        b = Image.open(tmp_path / "bs1" / ref["path"])
        assert a.tobytes() == b.tobytes()
        assert record["sha256"] == ref["sha256"]


def test_batch_invariant_makes_batched_unet_match_single(tiny_sd):
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd / "unet").eval()
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(4, 4, 32, 32, generator=gen), torch.randn(4, 77, 32, generator=gen)
    t = torch.tensor(500)
    with torch.no_grad(), batch_invariant(unet):
        batched = unet(x, t, ctx).sample
        single = torch.cat([unet(x[i : i + 1], t, ctx[i : i + 1]).sample for i in range(4)])
    assert torch.equal(batched, single)
    assert "forward" not in unet.time_embedding.linear_1.__dict__  # restored afterwards


WORKER = """
import json, os, sys
from pathlib import Path
from mixdiff_cli.sampling.batch import run_batch
from mixdiff_cli.sampling.options import GenerationOptions
args = json.loads(sys.argv[1])
kill = args.get("kill_after")  # [n, signal]: the process signals itself once its n-th image is recorded


def on_image(record, done, total):
    if kill and done == kill[0]:
        os.kill(os.getpid(), kill[1])


result = run_batch(args["catalog"], args["prompts"], args["out"], GenerationOptions(**args["options"]), on_image=on_image)
report = Path(args["out"]).parent / f"result-{os.environ.get('RANK', '0')}.json"
report.write_text(json.dumps(result.to_dict()))
sys.exit(result.exit_code)
"""


def worker(tmp_path: Path) -> Path:
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return path


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_batch_resumes_to_the_same_images(batch_catalog, tmp_path, sig):
    prompts = write_prompts(tmp_path / "p.txt", prompt_lines(9))
    options = {"batch_size": 1, "seed": 11, "steps": STEPS, "device": "cpu"}
    ref = run_batch(batch_catalog, prompts, tmp_path / "ref", GenerationOptions(**options))
    assert ref.written == 9

    out = tmp_path / "out"
    # the interruption is deterministic: the worker signals itself right after its second image is recorded
    args = json.dumps({"catalog": str(batch_catalog), "prompts": str(prompts), "out": str(out), "options": options,
                       "kill_after": [2, int(sig)]})
    proc = subprocess.Popen(
        [sys.executable, str(worker(tmp_path)), args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    if sig == signal.SIGTERM:
        assert proc.returncode == 143  # stopped cleanly: current image finished, no new one started
        assert json.loads((tmp_path / "result-0.json").read_text())["interrupted"] == signal.SIGTERM
    else:
        assert proc.returncode == -signal.SIGKILL
    partial = manifest(out)  # parses: no torn line survives
    assert len(partial) == 2
    for record in partial.values():  # every recorded image is complete and verifies
        from mixdiff_cli.sampling.manifest import file_sha256

        assert file_sha256(out / record["path"]) == record["sha256"]
    if sig == signal.SIGTERM:
        assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
        assert {p.name for p in out.glob("*.png")} == {r["path"] for r in partial.values()}  # nothing unrecorded

    with pytest.raises(BatchError, match="--resume"):
        run_batch(batch_catalog, prompts, out, GenerationOptions(**options))  # refuses to mix runs without --resume
    resumed = run_batch(batch_catalog, prompts, out, GenerationOptions(**options), BatchSettings(resume=True))
    assert resumed.skipped == len(partial) and resumed.written == 9 - len(partial) and resumed.exit_code == 0
    final, reference = manifest(out), manifest(tmp_path / "ref")
    assert final.keys() == reference.keys()
    assert {k: r["sha256"] for k, r in final.items()} == {k: r["sha256"] for k, r in reference.items()}
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 9


def test_resume_regenerates_only_missing_or_corrupt_images(batch_catalog, tmp_path):
    prompts = write_prompts(tmp_path / "p.txt", prompt_lines(4))
    engine = engine_for(batch_catalog)
    out = tmp_path / "out"
    first = run_batch(batch_catalog, prompts, out, GenerationOptions(batch_size=2, seed=1, steps=STEPS), engine=engine)
    records = manifest(out)
    victim, gone = list(records.values())[:2]
    (out / victim["path"]).write_bytes(b"not a png")  # fails sha256 verification
    (out / gone["path"]).unlink()
    again = run_batch(batch_catalog, prompts, out, GenerationOptions(batch_size=2, steps=STEPS), BatchSettings(resume=True), engine=engine)
    assert (first.written, again.skipped, again.written) == (4, 2, 2)
    assert again.base_seed == 1  # reused from the manifest: the rebuilt images match the others
    assert {k: r["sha256"] for k, r in manifest(out).items()} == {k: r["sha256"] for k, r in records.items()}
    changed = run_batch(batch_catalog, prompts, out, GenerationOptions(batch_size=2, steps=STEPS + 1), BatchSettings(resume=True), engine=engine)
    assert changed.written == 4 and changed.skipped == 0  # other settings: not the same images
    assert all(r["steps"] == STEPS + 1 for r in manifest(out).values())


def test_two_processes_write_every_item_once(batch_catalog, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed")
    lines = prompt_lines(12)
    prompts = write_prompts(tmp_path / "p.txt", lines)
    options = {"batch_size": 2, "seed": 3, "steps": STEPS, "device": "cpu"}
    out = tmp_path / "out"
    args = json.dumps({"catalog": str(batch_catalog), "prompts": str(prompts), "out": str(out), "options": options})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(worker(tmp_path)), args],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in (0, 1)]
    assert len(results) == 2 and all(r["written"] == 12 and r["processes"] == 2 for r in results)
    records = manifest(out)
    assert len(records) == 12
    assert {r["rank"] for r in records.values()} == {0, 1}  # both processes generated
    assert not list(out.glob("manifest.part*.jsonl"))  # merged into one manifest
    assert len(list(out.glob("*.png"))) == 12
    ref = run_batch(batch_catalog, prompts, tmp_path / "ref", GenerationOptions(**options))
    assert ref.written == 12
    assert {k: r["sha256"] for k, r in records.items()} == {k: r["sha256"] for k, r in manifest(tmp_path / "ref").items()}


def test_malformed_line_fails_fast_with_its_line_number(batch_catalog, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na blue dog --seed many\na green tree\n")
    out = tmp_path / "out"
    with pytest.raises(PromptFileError) as info:
        run_batch(batch_catalog, prompts, out, GenerationOptions(steps=STEPS, device="cpu"))
    assert f"{prompts}:2:" in str(info.value) and "seed" in str(info.value)
    assert not out.exists()  # nothing partial


def test_unknown_expert_in_a_line_names_the_line(batch_catalog, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red cat"}\n{"prompt": "a dog", "experts": ["purples"]}\n')
    with pytest.raises(PromptFileError) as info:
        run_batch(batch_catalog, prompts, tmp_path / "out", GenerationOptions(steps=STEPS, device="cpu"))
    assert f"{prompts}:2:" in info.value.message and "'purples'" in info.value.message
    assert "reds" in info.value.hint  # lists the known experts
    assert not (tmp_path / "out").exists()


def test_keep_going_skips_bad_lines_and_exits_1(batch_catalog, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na blue dog --w 13\na green tree --expert nobody\na red star\n")
    result = run_batch(batch_catalog, prompts, tmp_path / "out", GenerationOptions(steps=STEPS, device="cpu", seed=0), BatchSettings(keep_going=True))
    assert (result.total, result.written, result.failed, result.exit_code) == (4, 2, 2, 1)
    assert [e.split(": ", 1)[0] for e in result.errors] == [f"{prompts}:2", f"{prompts}:3"]
    assert sorted(r["prompt"] for r in manifest(tmp_path / "out").values()) == ["a red cat", "a red star"]


def test_unwritable_out_is_a_clear_error(batch_catalog, tmp_path):
    prompts = write_prompts(tmp_path / "p.txt", prompt_lines(2))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot write to --out") as info:
        run_batch(batch_catalog, prompts, blocker / "out", GenerationOptions(steps=STEPS, device="cpu"))
    assert "writable" in info.value.hint
    assert blocker.read_text() == "x"


def test_bad_options_are_usage_errors(batch_catalog, tmp_path):
    from mixdiff_cli.core.errors import UsageError

    prompts = write_prompts(tmp_path / "p.txt", prompt_lines(1))
    for kwargs in ({"batch_size": 0}, {"width": 100}, {"scheduler": "plms"}, {"seed": -1}, {"top_k": 4}, {"threshold": 1.0}):
        with pytest.raises(UsageError) as info:
            run_batch(batch_catalog, prompts, tmp_path / "out", GenerationOptions(**kwargs))
        assert info.value.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_unknown_run_expert_and_missing_base_leave_nothing(batch_catalog, tmp_path):
    from mixdiff_cli.core.errors import ExpertNotFound, MixdiffError

    prompts = write_prompts(tmp_path / "p.txt", prompt_lines(2))
    with pytest.raises(ExpertNotFound, match="purples"):
        run_batch(batch_catalog, prompts, tmp_path / "out", GenerationOptions(experts=["purples:0.5"], device="cpu"))
    broken = tmp_path / "broken.yaml"
    broken.write_text(f"version: 1\nbase: {{source: {tmp_path / 'no-such-model'}}}\nrouter: null\nexperts: []\n")
    with pytest.raises(MixdiffError, match="does not exist"):
        run_batch(broken, prompts, tmp_path / "out", GenerationOptions(device="cpu"))
    assert not (tmp_path / "out").exists()  # the folder made for the run is removed again


def test_cli_generate_prompts_exit_codes(batch_catalog, tmp_path):
    from typer.testing import CliRunner

    from mixdiff_cli.cli import app

    runner = CliRunner()
    base = ["generate", "--catalog", str(batch_catalog), "--steps", str(STEPS), "--seed", "1", "--device", "cpu"]
    good = write_prompts(tmp_path / "good.txt", prompt_lines(2))
    ok = runner.invoke(app, [*base, "--prompts", str(good), "--out", str(tmp_path / "a"), "--batch-size", "2", "--json"])
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.stdout)
    assert (report["written"], report["failed"], report["exit_code"]) == (2, 0, 0)

    bad = tmp_path / "bad.txt"
    bad.write_text("a red cat\na blue dog --steps lots\n")
    failed = runner.invoke(app, [*base, "--prompts", str(bad), "--out", str(tmp_path / "b")])
    assert failed.exit_code == 1
    assert f"error: {bad}:2: steps must be an integer" in failed.stderr and "Traceback" not in failed.output
    assert not (tmp_path / "b").exists()

    kept = runner.invoke(app, [*base, "--prompts", str(bad), "--out", str(tmp_path / "c"), "--keep-going"])
    assert kept.exit_code == 1
    assert f"{bad}:2" in kept.stderr and len(manifest(tmp_path / "c")) == 1

    usage = runner.invoke(app, [*base, "--prompts", str(good), "--out", str(tmp_path / "d"), "--batch-size", "0"])
    assert usage.exit_code == 2


def test_manifest_parts_merge_and_torn_lines(tmp_path):
    from mixdiff_cli.sampling.manifest import ManifestError, merge_manifest

    def line(i, sha="x"):
        return json.dumps({"id": f"{i:05d}-aaaa", "index": i, "sha256": sha}) + "\n"

    (tmp_path / "manifest.jsonl").write_text(line(2) + line(0))
    (tmp_path / "manifest.part0.jsonl").write_text(line(1) + line(2, "new") + '{"id": "00003-a')  # torn by a kill
    (tmp_path / "manifest.part1.jsonl").write_text(line(4))
    merged = merge_manifest(tmp_path)
    records = read_manifest(merged)
    assert [r["index"] for r in records] == [0, 1, 2, 4]  # one line per id, in item order
    assert records[2]["sha256"] == "new"  # the later line wins
    assert not list(tmp_path.glob("manifest.part*"))
    from mixdiff_cli.sampling.manifest import Appender as _Appender

    torn = tmp_path / "torn.jsonl"
    torn.write_text(line(0) + '{"id": "00001-')
    appender = _Appender(torn)  # a writer resuming a killed run cuts the torn line before appending
    appender.write({"id": "00001-aaaa", "index": 1})
    appender.close()
    assert [r["index"] for r in read_manifest(torn)] == [0, 1] and torn.read_text().count("\n") == 2
    merged.write_text(line(0) + "garbage\n" + line(1))
    with pytest.raises(ManifestError, match="manifest.jsonl:2"):
        read_manifest(merged)
