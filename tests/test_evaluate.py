"""`mixdiff evaluate`: metric functions against hand-computed values, figures, and the three commands end
to end on the tiny fixtures (real router, real engine, real LoRAs), including gates and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from mixdiff_cli import evaluation as E
from mixdiff_cli.evaluation import figures as F
from mixdiff_cli.cli import app
from mixdiff_cli.core.errors import UsageError
from mixdiff_cli.routing.labels import Labeled, LabelsError, check_labels, read_labeled

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def distinct_colours(img: Image.Image, box) -> int:
    return len(set(img.convert("RGB").crop(box).getdata()))


# --- routing metrics: a fixed list of (label, probs), every number by hand ---------------------------

EXPERTS = ["a", "b", "c"]
LABELS = ["a", "a", "b", "b", "c", "c"]
PROBS = [
    {"a": 0.7, "b": 0.2, "c": 0.1},  # top-1 a: right, p .7
    {"a": 0.4, "b": 0.5, "c": 0.1},  # top-1 b: wrong; top-2 {b, a}: right, p .5
    {"a": 0.1, "b": 0.8, "c": 0.1},  # b: right, p .8
    {"a": 0.3, "b": 0.3, "c": 0.4},  # c: wrong; top-2 {c, a} (a wins the tie by catalog order): wrong, p .4
    {"a": 0.05, "b": 0.05, "c": 0.9},  # c: right, p .9
    {"a": 0.6, "b": 0.1, "c": 0.3},  # a: wrong; top-2 {a, c}: right, p .6
]


def test_routing_metrics_match_hand_computed_values():
    m = E.routing_metrics(LABELS, PROBS, EXPERTS, top_k=2, threshold=0.5, bins=5)
    assert m["n"] == 6 and m["top_k"] == 2
    assert m["top1_accuracy"] == pytest.approx(3 / 6)
    assert m["topk_accuracy"] == pytest.approx(5 / 6)
    assert [p["top1"] for p in m["predictions"]] == ["a", "b", "b", "c", "c", "a"]
    assert m["predictions"][3]["ranking"] == ["c", "a"]
    assert m["errors"] == [1, 3, 5]
    assert m["confusion"]["matrix"] == [[1, 1, 0], [0, 1, 1], [1, 0, 1]]
    for e in EXPERTS:
        p = m["per_expert"][e]
        assert (p["support"], p["predicted"], p["correct"]) == (2, 2, 1)
        assert p["precision"] == p["recall"] == p["f1"] == pytest.approx(0.5)
    assert m["balanced_accuracy"] == pytest.approx(0.5) and m["macro_f1"] == pytest.approx(0.5)
    usage = m["usage"]
    assert usage["top1"] == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    # top-2 sets: ab, ba, ba (tie a/c -> a), ca (tie -> a), ca, ac
    assert usage["topk"] == pytest.approx({"a": 1.0, "b": 0.5, "c": 0.5})
    assert usage["mean_prob"] == pytest.approx({"a": 2.15 / 6, "b": 1.95 / 6, "c": 1.9 / 6})  # columns of PROBS
    assert usage["balance"] == pytest.approx(1.0) and usage["cv"] == pytest.approx(0.0) and usage["unused"] == []
    cal = m["calibration"]
    # confident (p >= .5): items 0, 1, 2, 4, 5 -> 3 right of 5; below: item 3 (wrong)
    assert cal["confident"] == {"n": 5, "accuracy": pytest.approx(0.6)}
    assert cal["unconfident"] == {"n": 1, "accuracy": 0.0}
    assert cal["below_threshold"] == 1 and cal["below_threshold_fraction"] == pytest.approx(1 / 6)
    assert cal["mean_confidence"] == pytest.approx(3.9 / 6)
    # bins of width .2: [.4,.6) items 1, 3 (conf .45, acc 0); [.6,.8) items 0, 5 (.65, .5); [.8,1] items 2, 4 (.85, 1)
    assert [b["n"] for b in cal["bins"]] == [0, 0, 2, 2, 2]
    assert [b["accuracy"] for b in cal["bins"]] == [None, None, 0.0, 0.5, 1.0]
    assert [b["confidence"] for b in cal["bins"][2:]] == pytest.approx([0.45, 0.65, 0.85])
    assert cal["ece"] == pytest.approx(2 / 6 * 0.45 + 2 / 6 * 0.15 + 2 / 6 * 0.15)


def test_routing_metrics_unbalanced_usage_and_bad_input():
    m = E.routing_metrics(["a", "b", "c", "a"], [{"a": 0.9, "b": 0.05, "c": 0.05}] * 4, EXPERTS, top_k=1)
    assert m["top1_accuracy"] == 0.5 and m["topk_accuracy"] == 0.5
    assert m["usage"]["top1"] == {"a": 1.0, "b": 0.0, "c": 0.0}
    assert m["usage"]["balance"] == pytest.approx(0.0) and m["usage"]["max_share"] == 1.0
    assert m["usage"]["unused"] == ["b", "c"] and m["usage"]["cv"] == pytest.approx(math.sqrt(2))
    b = m["per_expert"]["b"]
    assert (b["precision"], b["recall"], b["f1"]) == (None, 0.0, None)
    assert m["per_expert"]["a"]["precision"] == 0.5 and m["per_expert"]["a"]["recall"] == 1.0
    assert m["balanced_accuracy"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="unknown experts"):
        E.routing_metrics(["z"], [{"a": 1.0}], EXPERTS)
    with pytest.raises(ValueError, match="no labelled prompts"):
        E.routing_metrics([], [], EXPERTS)


def test_loss_matrix_metrics_and_gates():
    base = {"stripes": 0.20, "shapes": 0.10, "other": 0.40}
    experts = {
        "stripes": {"stripes": 0.10, "shapes": 0.11, "other": 0.40},  # ratios .5, 1.1, 1.0: specialised
        "shapes": {"stripes": 0.18, "shapes": 0.095, "other": 0.30},  # ratios .9, .95, .75: best on "other"
        "extra": {"stripes": 0.30, "shapes": 0.10, "other": 0.40},  # no own domain
    }
    m = E.loss_matrix_metrics(base, experts)
    assert m["ratios"]["stripes"] == pytest.approx({"stripes": 0.5, "shapes": 1.1, "other": 1.0})
    s, sh, ex = m["per_expert"]["stripes"], m["per_expert"]["shapes"], m["per_expert"]["extra"]
    assert (s["best_domain"], s["own_domain"], s["specialised"]) == ("stripes", "stripes", True)
    assert s["own_ratio"] == pytest.approx(0.5) and s["margin"] == pytest.approx(0.5)
    assert (sh["best_domain"], sh["own_ratio"], sh["specialised"]) == ("other", pytest.approx(0.95), False)
    assert sh["margin"] == pytest.approx(0.75 - 0.95)
    assert (ex["own_domain"], ex["specialised"], ex["best_domain"]) == (None, None, "shapes")
    assert m["per_domain"]["shapes"]["best_expert"] == "shapes" and m["per_domain"]["shapes"]["best"] == "shapes"
    assert m["per_domain"]["other"]["best_expert"] == "shapes"
    assert m["summary"] == {"with_own_domain": 2, "specialised": 1, "own_best_on_domain": 2,
                            "worst_own_ratio": pytest.approx(0.95), "mean_own_ratio": pytest.approx(0.725)}

    passed, = E.gates(m, max_loss_ratio=0.96)
    failed, = E.gates(m, max_loss_ratio=0.9)
    assert passed["passed"] and passed["value"] == pytest.approx(0.95)
    assert not failed["passed"] and "shapes 0.950" in failed["detail"] and "stripes" not in failed["detail"]
    acc = E.routing_metrics(LABELS, PROBS, EXPERTS)
    ok, bad = E.gates(acc, min_accuracy=0.5)[0], E.gates(acc, min_accuracy=0.51)[0]
    assert ok["passed"] and not bad["passed"] and bad["value"] == 0.5
    report = E.Report("routing", {"gates": [ok, bad]}, "")
    with pytest.raises(E.GateFailed, match="top-1 routing accuracy 0.500 < --min-accuracy 0.51"):
        report.check()


def test_read_labeled_files_and_their_errors(tmp_path):
    jl = tmp_path / "l.jsonl"
    jl.write_text('{"prompt": "a  red circle", "expert": "shapes"}\n\n{"prompt": "stripes", "label": "stripes"}\n')
    assert [(x.prompt, x.expert) for x in read_labeled(jl)] == [("a red circle", "shapes"), ("stripes", "stripes")]
    assert read_labeled(jl)[1].where == f"{jl}:3"
    cv = tmp_path / "l.csv"
    cv.write_text('Prompt,Expert\n"a red circle, big",shapes\n\nblue stripes,stripes\n')
    assert [(x.prompt, x.expert) for x in read_labeled(cv)] == [("a red circle, big", "shapes"), ("blue stripes", "stripes")]
    cases = {
        "empty.jsonl": ("\n\n", "no prompts in"),
        "bad.jsonl": ('{"prompt": "x", "expert": "a"}\n{oops\n', "bad.jsonl:2: not valid JSON"),
        "noexpert.jsonl": ('{"prompt": "x"}\n', "noexpert.jsonl:1: no 'expert'"),
        "nocol.csv": ("text,expert\nx,a\n", "no column 'prompt'"),
        "labels.txt": ("x\n", "unknown labelled-prompt file type"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(LabelsError, match=message.replace("(", r"\(")):
            read_labeled(tmp_path / name)
    with pytest.raises(LabelsError, match="does not exist"):
        read_labeled(tmp_path / "missing.jsonl")
    with pytest.raises(LabelsError, match=r"l.jsonl:3: unknown expert 'stripes'.*Known experts: shapes"):
        check_labels(read_labeled(jl), ["shapes"])


def test_parse_data_specs():
    assert E.parse_data_specs(["a=/x/a", "/y/stripes"]) == {"a": Path("/x/a"), "stripes": Path("/y/stripes")}
    for bad in (["=dir"], ["a=/x", "a=/y"], []):
        with pytest.raises(UsageError):
            E.parse_data_specs(bad)


# --- figures ----------------------------------------------------------------------------------------


def test_heatmap_bars_and_contact_sheet_are_labelled_images(tmp_path):
    fig = F.heatmap([[3, 1], [0, 4]], ["shapes", "stripes"], ["shapes", "a-very-long-expert-name"], highlight=[(0, 0)],
                    style=F.HeatmapStyle(title="Confusion", row_title="label", col_title="top-1", cmap="blues"))
    fig.save(tmp_path / "h.png")
    back = Image.open(tmp_path / "h.png")
    assert back.mode == "RGB" and back.size == fig.size and fig.width > 100 and fig.height > 100
    layout = fig.info["layout"]
    for key in ("title", "row_title", "col_title", "row:0", "row:1", "col:0", "col:1", "cell:0:0", "cell:1:1"):
        assert distinct_colours(back, layout[key]) > 3, key  # text or shading drawn there
    assert layout["col:1"][3] - layout["col:1"][1] > layout["col:1"][2] - layout["col:1"][0]  # long label turned vertical
    # the highest count is shaded darkest, the zero lightest
    dark = back.getpixel((layout["cell:1:1"][0] + 2, layout["cell:1:1"][1] + 2))
    light = back.getpixel((layout["cell:1:0"][0] + 2, layout["cell:1:0"][1] + 2))
    assert sum(dark) < sum(light)
    assert distinct_colours(back, (back.width - 4, 0, back.width, back.height)) == 1  # the right margin is blank

    bar = F.bars([0.5, 0.25, 0.0], ["a", "bb", "ccc"], title="usage", reference=1 / 3)
    x0, y0, x1, y1 = bar.info["layout"]["bar:0"]
    filled = bar.getpixel((x0 + (x1 - x0) // 4, (y0 + y1) // 2))
    empty = bar.getpixel((x1 - 3, (y0 + y1) // 2))
    assert filled != empty and distinct_colours(bar, bar.info["layout"]["row:2"]) > 1

    cells = [[Image.new("RGB", (64, 64), (200, 10 * i, 10 * j)) for j in range(3)] for i in range(2)]
    sheet = F.contact_sheet(cells, ["a red circle on a white background, long enough to wrap", "stripes"],
                            ["routed", "base", "shapes"], title="Samples", captions=[["shapes 1.00", "", ""], ["", "", "CLIP 21.0"]])
    lay = sheet.info["layout"]
    assert sheet.mode == "RGB" and lay["cell:0:0"][2] - lay["cell:0:0"][0] == 128  # 64px images enlarged to 128
    assert sheet.getpixel((lay["cell:1:2"][0] + 5, lay["cell:1:2"][1] + 5)) == (200, 10, 20)
    for key in ("title", "row:0", "row:1", "col:0", "col:2", "caption:0:0", "caption:1:2"):
        assert distinct_colours(sheet, lay[key]) > 1, key
    assert lay["row:0"][3] - lay["row:0"][1] > 2 * (lay["row:1"][3] - lay["row:1"][1]) - 4  # the long prompt wrapped


# --- end to end on the tiny fixtures ----------------------------------------------------------------

PROMPTS = {
    "shapes": "a red circle on a white background",
    "stripes": "blue and yellow stripes pattern",
    "scenery": "a landscape with a mountain and a river at sunset",
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_sd, lora_files, full_model) -> dict:
    """A catalog of two LoRA experts and one full-model expert, with held-out data for two of them."""
    from mixdiff_cli.demo.data import write_dataset
    from mixdiff_cli.experts.manage import add_expert, init_catalog

    root = tmp_path_factory.mktemp("evaluate")
    catalog = root / "experts.yaml"
    init_catalog(catalog, base=str(tiny_sd))
    add_expert(catalog, str(lora_files[("sd1", "diffusers")]), name="shapes", prompts=[PROMPTS["shapes"]])
    add_expert(catalog, str(lora_files[("sd1", "kohya")]), name="stripes", prompts=[PROMPTS["stripes"]])
    add_expert(catalog, str(full_model), name="scenery", prompts=[PROMPTS["scenery"]])
    data = {d: write_dataset(d, root / "heldout" / d, 3, seed=5, split="heldout") for d in ("shapes", "stripes")}
    labeled = root / "labeled.jsonl"
    rows = [
        {"prompt": PROMPTS["shapes"], "expert": "shapes"},
        {"prompt": PROMPTS["stripes"], "expert": "stripes"},
        {"prompt": PROMPTS["scenery"], "expert": "scenery"},
        {"prompt": PROMPTS["stripes"], "expert": "shapes"},  # mislabelled on purpose: the router says stripes
        {"prompt": PROMPTS["scenery"], "expert": "scenery"},
    ]
    labeled.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "catalog": catalog, "data": data, "labeled": labeled}


def test_routing_command_end_to_end(workspace, tmp_path):
    out = tmp_path / "routing"
    result = run("evaluate", "routing", "--prompts", workspace["labeled"], "-c", workspace["catalog"], "-o", out,
                 "--min-accuracy", "0.75", "--top-k", "2")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    m = report["metrics"]
    # each expert's only example prompt is its prototype (cosine 1): routed to it; the mislabelled one is wrong
    assert m["n"] == 5 and m["top1_accuracy"] == pytest.approx(4 / 5)
    assert m["topk_accuracy"] == pytest.approx(1.0 if m["predictions"][3]["ranking"][1] == "shapes" else 0.8)
    assert m["experts"] == ["shapes", "stripes", "scenery"]
    assert m["confusion"]["matrix"] == [[1, 1, 0], [0, 1, 0], [0, 0, 2]]
    assert m["errors"] == [3] and m["predictions"][3]["top1"] == "stripes"
    assert m["per_expert"]["shapes"]["recall"] == 0.5 and m["per_expert"]["stripes"]["precision"] == 0.5
    assert m["usage"]["top1"] == pytest.approx({"shapes": 0.2, "stripes": 0.4, "scenery": 0.4})
    assert m["routes"] == {"abstained": 0, "trigger_forced": 0, "chosen_top1_accuracy": pytest.approx(0.8)}
    assert m["calibration"]["confident"]["n"] + m["calibration"]["below_threshold"] == 5
    assert report["catalog"]["hash"] and report["versions"]["torch"] and report["router"]["kind"] == "prototypes"
    assert report["gates"][0]["passed"] and report["settings"]["top_k"] == 2
    assert "| shapes | 1 | 1 | 0 |" in (out / "report.md").read_text()
    assert "top-1 80.0%" in result.stderr and "gate min_accuracy: pass" in result.stderr
    for name in ("confusion.png", "usage.png", "calibration.png"):
        with Image.open(out / name) as img:
            assert img.mode == "RGB" and img.width > 150 and img.height > 80
            assert distinct_colours(img, (0, 0, img.width, 30)) > 1  # the title
    expected = E.routing_figures(m)["confusion.png"]
    with Image.open(out / "confusion.png") as img:
        assert img.size == expected.size
        for key in ("row:0", "col:2", "cell:2:2"):
            assert distinct_colours(img, expected.info["layout"][key]) > 1


def test_routing_gate_json_and_bad_labels(workspace, tmp_path):
    out = tmp_path / "r"
    gated = run("evaluate", "routing", "--prompts", workspace["labeled"], "-c", workspace["catalog"], "-o", out, "--min-accuracy", "0.9", "--json")
    assert gated.exit_code == 1
    assert "quality gate failed: top-1 routing accuracy 0.800 < --min-accuracy 0.9" in gated.stderr
    assert json.loads(gated.stdout) == json.loads((out / "report.json").read_text())  # the report is written anyway
    quiet = run("-q", "evaluate", "routing", "--prompts", workspace["labeled"], "-c", workspace["catalog"], "-o", tmp_path / "q")
    assert quiet.exit_code == 0 and quiet.stdout.strip() == str(tmp_path / "q" / "report.md") and quiet.stderr == ""

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a cat", "expert": "shapes"}\n{"prompt": "a dog", "expert": "animals"}\n')
    result = run("evaluate", "routing", "--prompts", bad, "-c", workspace["catalog"], "-o", tmp_path / "x")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "bad.jsonl:2: unknown expert 'animals'" in result.stderr and "Known experts: shapes, stripes, scenery" in result.stderr
    empty = tmp_path / "empty.csv"
    empty.write_text("prompt,expert\n")
    result = run("evaluate", "routing", "--prompts", empty, "-c", workspace["catalog"])
    assert result.exit_code == 1 and "no prompts in" in result.stderr
    result = run("evaluate", "routing", "--prompts", workspace["labeled"], "-c", workspace["catalog"], "--threshold", "1.5")
    assert result.exit_code == 2 and "--threshold 1.5" in result.stderr
    assert not (tmp_path / "x").exists()


def test_routing_counts_trigger_words_and_abstentions_apart_from_the_gate(tiny_sd, tmp_path):
    from mixdiff_cli.experts.manage import add_expert, init_catalog

    catalog = tmp_path / "experts.yaml"
    init_catalog(catalog, base=str(tiny_sd))
    lora = tmp_path / "x.safetensors"
    from mixdiff_cli.testing import make_lora

    make_lora(tiny_sd, lora, seed=3)
    add_expert(catalog, str(lora), name="animals", prompts=["a photo of a cat", "a dog in the grass"], trigger=["zoo"])
    add_expert(catalog, str(lora), name="city", prompts=["a city street at night", "an old house and a car"])
    items = [Labeled("a cat and a dog", "animals"), Labeled("a city street with a car at the zoo", "city"),
             Labeled("a street in the city", "city")]
    report = E.evaluate_routing(catalog, items, E.RoutingSettings(encoder="words", top_k=1, threshold=0.9))
    m = report.data["metrics"]
    assert m["top1_accuracy"] == 1.0 and m["predictions"][1]["triggered"] == ["animals"]
    assert m["routes"]["trigger_forced"] == 1
    assert m["predictions"][1]["chosen"][0][0] == "animals"  # the trigger wins the final route...
    assert m["routes"]["chosen_top1_accuracy"] < 1.0  # ...which the route-level accuracy shows
    below = [i for i, p in enumerate(m["predictions"]) if p["confidence"] < 0.9]
    assert m["calibration"]["below_threshold"] == len(below)
    assert m["routes"]["abstained"] == len([i for i in below if i != 1])  # below threshold and no trigger: bare base
    assert report.data["router"]["encoder"] == "words"


def test_loss_matrix_is_deterministic_batch_invariant_and_is_fine_tunes_loss(workspace, tiny_sd, lora_files):
    from mixdiff_cli.training.loss import denoising_loss

    data = workspace["data"]
    one = E.evaluate_experts(workspace["catalog"], data, E.ExpertsSettings(batch_size=16, evals=6))
    again = E.evaluate_experts(workspace["catalog"], data, E.ExpertsSettings(batch_size=16, evals=6))
    small = E.evaluate_experts(workspace["catalog"], data, E.ExpertsSettings(batch_size=4, evals=6))
    assert one.data["losses"] == again.data["losses"]  # bit for bit
    flat = lambda r: [r.data["losses"]["base"][d] for d in data] + [v for row in r.data["losses"]["experts"].values() for v in row.values()]
    assert len(flat(one)) == 2 + 3 * 2
    assert flat(small) == pytest.approx(flat(one), rel=1e-6, abs=0)  # batch size: float32 rounding only
    assert one.markdown.split("## Loss matrix")[1] == small.markdown.split("## Loss matrix")[1]  # the tables agree
    # the same number fine-tune reports for a LoRA on a folder (same fixed noise, same timesteps)
    ref = denoising_loss(tiny_sd, data["shapes"], lora_files[("sd1", "diffusers")], evals=6)
    assert one.data["losses"]["base"]["shapes"] == pytest.approx(ref.base, rel=1e-6)
    assert one.data["losses"]["experts"]["shapes"]["shapes"] == pytest.approx(ref.lora, rel=1e-6)
    # every expert changes the loss, the full-model expert most (another UNet altogether)
    base = one.data["losses"]["base"]
    for e, row in one.data["losses"]["experts"].items():
        assert all(row[d] != base[d] for d in data), e
    ratios = one.data["metrics"]["ratios"]
    assert abs(math.log(ratios["scenery"]["shapes"])) > abs(math.log(ratios["shapes"]["shapes"]))
    assert one.data["domains"]["shapes"]["images"] == 3 and one.data["domains"]["shapes"]["evals"] == 6
    assert one.data["seeds"]["heldout_noise"] == 20261126


def test_experts_command_figure_gates_and_bad_data(workspace, tmp_path):
    data = [f"{d}={p}" for d, p in workspace["data"].items()]
    args = ["evaluate", "experts", "-c", workspace["catalog"], "--evals", "3", "--expert", "shapes", "--expert", "stripes"]
    args += [x for spec in data for x in ("--data", spec)]
    out = tmp_path / "experts"
    ok = run(*args, "-o", out, "--max-loss-ratio", "2")
    assert ok.exit_code == 0, ok.output
    report = json.loads((out / "report.json").read_text())
    assert list(report["losses"]["experts"]) == ["shapes", "stripes"] and report["gates"][0]["passed"]
    assert "gate max_loss_ratio: pass" in ok.stderr and "shapes" in ok.stdout
    with Image.open(out / "losses.png") as img:
        fig = E.loss_figure(report["losses"]["base"], report["losses"]["experts"], report["metrics"])
        assert img.mode == "RGB" and img.size == fig.size
        for key in ("title", "row:0", "row:2", "col:0", "col:1", "cell:1:0", "cell:2:1"):
            assert distinct_colours(img, fig.info["layout"][key]) > 1, key
        # own-domain cells are outlined in black
        x0, y0, _, _ = fig.info["layout"]["cell:1:0"]
        assert img.getpixel((x0 + 2, y0 + 2)) == F.INK

    worst = report["metrics"]["summary"]["worst_own_ratio"]
    failed = run(*args, "-o", tmp_path / "gated", "--max-loss-ratio", str(worst * 0.999))
    assert failed.exit_code == 1 and "quality gate failed: loss/base on own domain above --max-loss-ratio" in failed.stderr
    assert (tmp_path / "gated" / "report.md").is_file()

    missing = run("evaluate", "experts", "-c", workspace["catalog"], "--data", f"shapes={tmp_path / 'nope'}", "-o", tmp_path / "m")
    assert missing.exit_code == 1 and "dataset folder" in missing.stderr and "does not exist" in missing.stderr
    unowned = run("evaluate", "experts", "-c", workspace["catalog"], "--data", f"other={workspace['data']['shapes']}", "--max-loss-ratio", "1")
    assert unowned.exit_code == 2 and "needs a domain named after an expert" in unowned.stderr
    unknown = run("evaluate", "experts", "-c", workspace["catalog"], "--data", data[0], "--expert", "nobody")
    assert unknown.exit_code == 1 and "no expert named 'nobody'" in unknown.stderr


def _tiny_clip(folder: Path) -> Path:
    """A CLIPModel from a tiny config, a CLIPImageProcessor config and a local tokenizer (no download)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from mixdiff_cli.testing import VOCAB
    from mixdiff_cli.core.tokenizer import BOS, EOS, write_clip_tokenizer

    write_clip_tokenizer(folder, VOCAB)
    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), bos_token=BOS, eos_token=EOS,
                        unk_token=EOS, pad_token=EOS, model_max_length=77)
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_samples_command_contact_sheet_and_clip_score(workspace, tmp_path):
    import torch
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from mixdiff_cli.sampling.pngmeta import read_record

    clip = _tiny_clip(tmp_path / "clip")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPTS['shapes']}\n# a comment\n{PROMPTS['stripes']} --seed 77\n")
    out = tmp_path / "samples"
    result = run("evaluate", "samples", "--prompts", prompts, "-c", workspace["catalog"], "-o", out, "--steps", "2",
                 "--seed", "5", "--clip", clip, "--expert", "shapes", "--expert", "scenery", "--top-k", "1")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    cols = ["routed", "base", "shapes", "scenery"]
    assert report["summary"]["columns"] == cols
    assert [s["seed"] for s in report["samples"]] == [5, 77]  # SEED + index, unless the file sets one
    assert [s["route"]["chosen"] for s in report["samples"]] == [[["shapes", 1.0]], [["stripes", 1.0]]]
    for i, s in enumerate(report["samples"]):
        for c in cols:
            record = read_record(out / s["images"][c])
            assert record["seed"] == s["seed"] and record["steps"] == 2
            assert [e["name"] for e in record["experts"]] == ({"routed": [s["route"]["chosen"][0][0]], "base": []}.get(c, [c]))
        assert s["delta_from_base"]["scenery"] > 0.001 and s["delta_from_base"]["shapes"] > 0
        # the routed column with one chosen expert is that expert's image, bit for bit
        if s["route"]["chosen"][0][0] == "shapes":
            assert s["delta_from_base"]["routed"] == s["delta_from_base"]["shapes"]
            with Image.open(out / s["images"]["routed"]) as a, Image.open(out / s["images"]["shapes"]) as b:
                assert a.tobytes() == b.tobytes()

    # CLIP scores: 100 * max(cos, 0), checked against CLIPModel's own forward (logits_per_image / logit_scale)
    model = CLIPModel.from_pretrained(clip).eval()
    tok, proc = CLIPTokenizer.from_pretrained(clip), CLIPImageProcessor.from_pretrained(clip)
    for s in report["samples"]:
        for c in cols:
            with Image.open(out / s["images"][c]) as img:
                inputs = {**tok([s["prompt"]], return_tensors="pt"), **proc(images=[img.convert("RGB")], return_tensors="pt")}
            with torch.no_grad():
                output = model(**inputs)
            cos = float(output.logits_per_image[0, 0] / model.logit_scale.exp())
            assert s["clip_score"][c] == pytest.approx(100 * max(cos, 0.0), abs=1e-3)
            assert 0 <= s["clip_score"][c] <= 100
    assert report["summary"]["clip_score"]["base"] == pytest.approx(sum(s["clip_score"]["base"] for s in report["samples"]) / 2)

    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.mode == "RGB"
        assert sheet.width >= 4 * 128 and sheet.height >= 2 * 128  # 4 columns x 2 rows of 64px images, enlarged
        assert distinct_colours(sheet, (0, 0, sheet.width, 24)) > 1  # title
        assert distinct_colours(sheet, (0, 40, 150, sheet.height)) > 1  # row labels (prompts)
    md = (out / "report.md").read_text()
    assert "![contact sheet](contact_sheet.png)" in md and "CLIP score" in md


def test_samples_bad_inputs(workspace, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    nope = run("evaluate", "samples", "--prompts", prompts, "-c", workspace["catalog"], "--clip", tmp_path / "no-clip", "-o", tmp_path / "o")
    assert nope.exit_code == 1 and "CLIP model folder" in nope.stderr and not (tmp_path / "o").exists()
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    empty = run("evaluate", "samples", "--prompts", tmp_path / "empty.txt", "-c", workspace["catalog"])
    assert empty.exit_code == 1 and "no prompts" in empty.stderr
    (tmp_path / "notclip").mkdir()
    (tmp_path / "notclip" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(E.EvaluateError, match="not CLIP"):
        E.clip_scores(tmp_path / "notclip", [Image.new("RGB", (8, 8))], ["x"])


def test_a_command_that_warns_finishes_and_shows_the_warning_once():
    """Regression: `handled` replayed caught warnings inside catch_warnings(record=True), appending to the
    list it iterated (the samples command, which triggers a PEFT UserWarning, grew to 21 GB)."""
    import warnings

    from mixdiff_cli.cli._errors import handled

    def body() -> str:
        warnings.warn("something odd", UserWarning)
        return "done"

    with pytest.warns(UserWarning, match="something odd") as shown:
        assert handled(body)() == "done"
    assert len(shown) == 1
