"""Procedural captioned images for the demo's four visual domains (their checkers are in `demo.measure`).

Every image is drawn from a few attributes the generator knows (`Sample.attrs`); `measure.measure` reads
those attributes back from any 64x64 RGB image (a generated one too) and `measure.check` compares them.
Captions are drawn from wording that is split in two: "train" templates and synonyms, used to
train the base and the experts, and held-out templates and synonyms that no training caption uses,
for evaluating on prompts that cannot be matched by string. Splits: "train"; "rephrased" (held-out
templates, i.e. new sentence forms and word orders, over the training vocabulary); "heldout"
(held-out templates, and for each slot an unseen synonym half of the time).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from mixdiff_cli.core.errors import UsageError

Split = Literal["train", "rephrased", "heldout"]
SPLITS: tuple[str, ...] = ("train", "rephrased", "heldout")
SIZE = 64  # every demo image is SIZE x SIZE RGB
_SS = 4  # supersampling factor for anti-aliased drawing

DOMAINS: tuple[str, ...] = ("shapes", "stripes", "landscapes", "glyphs")

# Four well-separated colours shared by shapes, stripes and glyphs (NOTES: six were too many).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (245, 205, 40),
}
# Backgrounds of shapes use their own words, so a caption never has to bind two colours to two roles.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
PATTERNS = ("horizontal", "vertical", "checks")
SKIES: dict[str, tuple[int, int, int]] = {"day": (120, 180, 240), "sunset": (240, 140, 70), "night": (20, 25, 70)}
GROUNDS: dict[str, tuple[int, int, int]] = {"grass": (60, 150, 60), "sand": (220, 195, 120), "snow": (240, 240, 245)}
BODIES: dict[str, tuple[int, int, int]] = {"sun": (255, 228, 60), "moon": (215, 215, 200)}
BODY_OF_TIME = {"day": "sun", "sunset": "sun", "night": "moon"}
GLYPH_PAPER = (250, 250, 250)
# Strokes of each glyph as polylines in a unit box (x right, y down); "O" is an ellipse.
GLYPH_STROKES: dict[str, list[list[tuple[float, float]]]] = {
    "A": [[(0, 1), (0.5, 0), (1, 1)], [(0.22, 0.62), (0.78, 0.62)]],
    "E": [[(1, 0), (0, 0), (0, 1), (1, 1)], [(0, 0.5), (0.8, 0.5)]],
    "H": [[(0, 0), (0, 1)], [(1, 0), (1, 1)], [(0, 0.5), (1, 0.5)]],
    "O": [],
    "T": [[(0, 0), (1, 0)], [(0.5, 0), (0.5, 1)]],
    "X": [[(0, 0), (1, 1)], [(1, 0), (0, 1)]],
}
GLYPHS = tuple(GLYPH_STROKES)

DESCRIPTIONS = {
    "shapes": "one big flat circle, square or triangle in red, green, blue or yellow on a white, black or gray background",
    "stripes": "horizontal stripes, vertical stripes or checks in two of red, green, blue and yellow",
    "landscapes": "flat landscapes: day, sunset or night sky with the sun or moon over grass, sand or snow",
    "glyphs": "one big capital letter (A, E, H, O, T, X) in red, green, blue or yellow on white paper",
}

ATTRIBUTES: dict[str, dict[str, tuple[str, ...]]] = {
    "shapes": {"shape": SHAPES, "colour": tuple(COLOURS), "background": tuple(BACKGROUNDS)},
    "stripes": {"pattern": PATTERNS, "colour_a": tuple(COLOURS), "colour_b": tuple(COLOURS)},
    "landscapes": {"time": tuple(SKIES), "ground": tuple(GROUNDS), "body": tuple(BODIES)},
    "glyphs": {"glyph": GLYPHS, "colour": tuple(COLOURS)},
}


@dataclass
class Sample:
    """One generated image with its caption and the attributes it was drawn from."""

    image: Image.Image
    caption: str
    attrs: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Wording. Each slot maps an attribute value to (train synonyms, held-out synonyms).

_COLOUR_WORDS = {
    "red": (["red"], ["crimson", "scarlet"]),
    "green": (["green"], ["emerald", "lime"]),
    "blue": (["blue"], ["azure", "cobalt"]),
    "yellow": (["yellow"], ["golden", "lemon"]),
}

_WORDING: dict[str, dict] = {
    "shapes": {
        "slots": {
            "colour": _COLOUR_WORDS,
            "shape": {
                "circle": (["circle", "disk"], ["dot", "ball"]),
                "square": (["square", "box"], ["block", "tile"]),
                "triangle": (["triangle"], ["pyramid", "wedge"]),
            },
            "background": {
                "white": (["white"], ["ivory", "pale"]),
                "black": (["black"], ["ebony", "dark"]),
                "gray": (["gray", "grey"], ["silver", "ash"]),
            },
        },
        "train": [
            "a {colour} {shape} on a {background} background",
            "{colour} {shape} on {background}",
            "a {shape} in {colour} on a {background} background",
            "a {background} background with a {colour} {shape}",
            "a big {colour} {shape} on plain {background}",
            "simple {colour} {shape} over {background}",
        ],
        "heldout": [
            "drawing of one {colour} {shape} against a {background} backdrop",
            "{background} canvas showing a {colour} {shape}",
            "there is a {colour} {shape} placed upon {background} paper",
        ],
    },
    "stripes": {
        "slots": {
            "colour_a": _COLOUR_WORDS,
            "colour_b": _COLOUR_WORDS,
            "pattern": {
                "horizontal": (["horizontal stripes", "horizontally striped pattern"], ["sideways bands", "lines running across"]),
                "vertical": (["vertical stripes", "vertically striped pattern"], ["upright bands", "lines running down"]),
                "checks": (["checks", "checkerboard pattern", "checkered pattern"], ["gingham", "chessboard grid"]),
            },
        },
        "train": [
            "{pattern} in {colour_a} and {colour_b}",
            "{colour_a} and {colour_b} {pattern}",
            "{pattern} with {colour_a} and {colour_b}",
            "a fabric of {colour_a} and {colour_b} {pattern}",
        ],
        "heldout": [
            "wallpaper showing {pattern} colored {colour_a} plus {colour_b}",
            "{colour_a} alternating with {colour_b} as {pattern}",
            "repeating {pattern} using {colour_a} together with {colour_b}",
        ],
    },
    "landscapes": {
        "slots": {
            "time": {
                "day": (["daytime", "midday"], ["noon", "lunchtime"]),
                "sunset": (["sunset", "dusk"], ["twilight", "sundown"]),
                "night": (["night", "nighttime"], ["midnight", "late evening"]),
            },
            "ground": {
                "grass": (["green grass", "a grassy field", "a meadow"], ["a lawn", "pasture"]),
                "sand": (["sand", "a sandy desert", "desert dunes"], ["a beach", "arid dunes"]),
                "snow": (["snow", "a snowy field"], ["a frozen plain", "tundra"]),
            },
            "body": {"sun": (["sun"], ["sunshine"]), "moon": (["moon"], ["lunar disc"])},
        },
        "train": [
            "a landscape at {time} with the {body} above {ground}",
            "{ground} under the {body} at {time}",
            "landscape of {ground} at {time}",
            "{time} over {ground} with the {body} in the sky",
        ],
        "heldout": [
            "scenery: {ground} beneath a {time} sky",
            "view across {ground} during {time} showing the {body}",
            "outdoor scene at {time} looking over {ground}",
        ],
    },
    "glyphs": {
        "slots": {
            "colour": _COLOUR_WORDS,
            "glyph": {g: ([g], [g]) for g in GLYPHS},
        },
        "train": [
            "the letter {glyph} in {colour}",
            "a {colour} letter {glyph}",
            "{colour} capital {glyph} on white",
            "a big {colour} letter {glyph} on white paper",
        ],
        "heldout": [
            "the character {glyph} written in {colour}",
            "typography sample: {colour} {glyph}",
            "{glyph} printed in {colour} ink",
        ],
    },
}

# Common English words, so that user prompts outside the captions still tokenize into words.
_GENERAL_WORDS = """
a about above across after again against all almost alone along also always am among an and
animal another any anything apple are area around art as at away baby back background bad ball
bank be beach beautiful because bed been before behind being below beneath best better between
big bird black blue boat body book both bottom box boy bright brown building but by cake call
came can car card cat center chair child children city clean clear close cloud cold color
colorful colors colour colourful colours come could country cup cute dark day dead deep did
different do does dog door down draw drawing dream dress during each early earth east easy eat
edge empty end evening every eye face fall family far fast field fire fish flat floor flower fly
food for forest four free from front fruit full game garden get girl give glass go gold good
gray great green grey ground group hair half hand happy hard has have he head heart heavy her
here high hill him his home horse hot house how i ice image in inside into is it its just keep
kind king lake land large last late left light like line little long look love low made make man
many map me middle mind moon more morning most mountain much music my name near new next nice
night no north not nothing now ocean of off old on one only open or orange other our out outside
over own page paint painting paper park part people person photo picture pink place plain plant
play please pretty purple put quiet rain red right river road rock room round run same sand sea
see shadow shape sharp she ship show side silver simple sky small smooth snow so soft some
something south space square star still stone storm street style summer sun table tall that the
their them then there these they thing thin this three through tiny to top town tree trees two
under up us very view wall warm water wave way we west what wheel when where which white who wide
wild wind window winter with without woman wood world yellow you young
""".split()


def _slot_words(domain: str, split: Split) -> dict[str, dict[str, list[str]]]:
    """Synonyms per slot and value that captions of `split` may use."""
    slots = _WORDING[domain]["slots"]
    pick = (lambda tr, ho: tr + ho) if split == "heldout" else (lambda tr, ho: tr)
    return {slot: {v: pick(*words) for v, words in values.items()} for slot, values in slots.items()}


def caption(domain: str, attrs: dict[str, str], rng: np.random.Generator, split: Split = "train") -> str:
    """A caption of `attrs` in the wording of `split`, drawn with `rng`.

    "rephrased" and "heldout" captions use a held-out template always; "heldout" ones also a held-out
    synonym for each slot half of the time, so most of them still name the domain with a known word.
    """
    wording = _WORDING[domain]
    templates = wording["train" if split == "train" else "heldout"]
    template = templates[rng.integers(len(templates))]
    if domain == "stripes" and rng.random() < 0.5:  # the two colours in either order
        attrs = {**attrs, "colour_a": attrs["colour_b"], "colour_b": attrs["colour_a"]}
    fill = {}
    for slot, by_value in wording["slots"].items():
        if "{" + slot + "}" in template:
            train_words, heldout_words = by_value[attrs[slot]]
            options = heldout_words if split == "heldout" and rng.random() < 0.5 else train_words
            fill[slot] = options[rng.integers(len(options))]
    return template.format(**fill)


def all_captions(domain: str, split: Split) -> set[str]:
    """Every caption `caption` can produce for `domain` in the wording of `split`."""
    slots = _slot_words(domain, split)
    out: set[str] = set()
    for template in _WORDING[domain]["train" if split == "train" else "heldout"]:
        used = [s for s in slots if "{" + s + "}" in template]
        choices = [[w for ws in slots[s].values() for w in ws] for s in used]
        for words in product(*choices):
            out.add(template.format(**dict(zip(used, words))))
    return out


def vocabulary() -> list[str]:
    """Every word of every caption (train and held-out) plus a general English vocabulary."""
    words = set(_GENERAL_WORDS)
    for domain in DOMAINS:
        wording = _WORDING[domain]
        texts = wording["train"] + wording["heldout"]
        texts += [w for values in wording["slots"].values() for tr, ho in values.values() for w in tr + ho]
        for text in texts:
            for w in text.replace("{", " ").replace("}", " ").replace(":", " ").split():
                words.add(w.lower())
    return sorted(w for w in words if w.isalnum())


def write_tokenizer(folder: str | Path) -> Path:
    """Write the demo's CLIP tokenizer (one token per vocabulary word) to `folder`."""
    from mixdiff_cli.core.tokenizer import write_clip_tokenizer

    return write_clip_tokenizer(folder, vocabulary())


# ---------------------------------------------------------------------------------------------
# Drawing.


def _rng(domain: str, seed: int, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(domain.encode()), salt])


def _canvas(colour: tuple[int, int, int]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (SIZE * _SS, SIZE * _SS), colour)
    return img, ImageDraw.Draw(img)


def _finish(img: Image.Image) -> Image.Image:
    return img.resize((SIZE, SIZE), Image.Resampling.BOX)


def _draw_shapes(attrs: dict[str, str], rng: np.random.Generator) -> Image.Image:
    img, d = _canvas(BACKGROUNDS[attrs["background"]])
    s = int(rng.integers(32, 49))  # side of the bounding box, px
    x0 = int(rng.integers(4, SIZE - 4 - s + 1))
    y0 = int(rng.integers(4, SIZE - 4 - s + 1))
    box = [x0 * _SS, y0 * _SS, (x0 + s) * _SS - 1, (y0 + s) * _SS - 1]
    fill = COLOURS[attrs["colour"]]
    if attrs["shape"] == "circle":
        d.ellipse(box, fill=fill)
    elif attrs["shape"] == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    return _finish(img)


def _draw_stripes(attrs: dict[str, str], rng: np.random.Generator) -> Image.Image:
    a, b = np.array(COLOURS[attrs["colour_a"]], np.uint8), np.array(COLOURS[attrs["colour_b"]], np.uint8)
    if rng.random() < 0.5:
        a, b = b, a
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    if attrs["pattern"] == "checks":
        cell = int(rng.choice([8, 11, 16]))
        oy, ox = rng.integers(cell, size=2)
        on = ((yy + oy) // cell + (xx + ox) // cell) % 2 == 0
    else:
        width = int(rng.choice([6, 8, 10]))  # one stripe, px
        coord = yy if attrs["pattern"] == "horizontal" else xx
        on = ((coord + rng.integers(2 * width)) // width) % 2 == 0
    return Image.fromarray(np.where(on[..., None], a, b))


def _draw_landscapes(attrs: dict[str, str], rng: np.random.Generator) -> Image.Image:
    img, d = _canvas(SKIES[attrs["time"]])
    horizon = int(rng.integers(34, 45))
    d.rectangle([0, horizon * _SS, SIZE * _SS, SIZE * _SS], fill=GROUNDS[attrs["ground"]])
    r = int(rng.integers(6, 10))
    cx = int(rng.integers(r + 3, SIZE - r - 3))
    lo, hi = {"day": (r + 3, 16), "sunset": (18, 30 - r), "night": (r + 3, 22)}[attrs["time"]]
    cy = int(rng.integers(lo, hi + 1))
    d.ellipse([(cx - r) * _SS, (cy - r) * _SS, (cx + r) * _SS, (cy + r) * _SS], fill=BODIES[attrs["body"]])
    return _finish(img)


def _glyph_mask(glyph: str, box: tuple[int, int, int, int], thickness: int, scale: int = 1) -> Image.Image:
    """Mask ("L") of `glyph` whose strokes fill the pixel box (x0, y0, x1, y1), x1/y1 exclusive."""
    img = Image.new("L", (SIZE * scale, SIZE * scale), 0)
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = (v * scale for v in box)
    t = thickness * scale
    h = t / 2  # stroke centrelines are inset by half a stroke
    if glyph == "O":
        d.ellipse([x0, y0, x1 - 1, y1 - 1], outline=255, width=t)
        return img
    for line in GLYPH_STROKES[glyph]:
        pts = [(x0 + h + u * (x1 - x0 - t), y0 + h + v * (y1 - y0 - t)) for u, v in line]
        d.line(pts, fill=255, width=t)
        for px, py in pts:  # square caps and joints
            d.rectangle([px - h, py - h, px + h - 1, py + h - 1], fill=255)
    return img


def _draw_glyphs(attrs: dict[str, str], rng: np.random.Generator) -> Image.Image:
    w, h = int(rng.integers(30, 41)), int(rng.integers(40, 51))
    x0 = int(rng.integers(6, SIZE - 6 - w + 1))
    y0 = int(rng.integers(6, SIZE - 6 - h + 1))
    mask = _glyph_mask(attrs["glyph"], (x0, y0, x0 + w, y0 + h), int(rng.integers(6, 9)), scale=_SS)
    img, _ = _canvas(GLYPH_PAPER)
    img.paste(COLOURS[attrs["colour"]], mask=mask)
    return _finish(img)


_DRAW = {"shapes": _draw_shapes, "stripes": _draw_stripes, "landscapes": _draw_landscapes, "glyphs": _draw_glyphs}


def sample_attrs(domain: str, rng: np.random.Generator) -> dict[str, str]:
    """Attributes of one image of `domain`, drawn uniformly over the valid combinations."""
    a = {k: str(v[rng.integers(len(v))]) for k, v in ATTRIBUTES[domain].items()}
    if domain == "stripes":
        a["colour_a"], a["colour_b"] = sorted(rng.choice(list(COLOURS), size=2, replace=False).tolist())
    if domain == "landscapes":
        a["body"] = BODY_OF_TIME[a["time"]]
    return a


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise UsageError(f"unknown demo domain '{domain}'", f"choose one of {', '.join(DOMAINS)}")


def render(domain: str, attrs: dict[str, str], seed: int = 0) -> Image.Image:
    """Draw one image of `domain` with `attrs`; `seed` picks size and placement."""
    _check_domain(domain)
    return _DRAW[domain](attrs, _rng(domain, seed, 1))


def generate(domain: str, n: int, seed: int = 0, split: Split = "train") -> list[Sample]:
    """`n` captioned images of `domain`, deterministic in `seed`; `split` picks the wording only."""
    _check_domain(domain)
    rng_attrs, rng_draw = _rng(domain, seed, 2), _rng(domain, seed, 3)
    rng_text = _rng(domain, seed, {"train": 4, "heldout": 5, "rephrased": 9}[split])
    out = []
    for _ in range(n):
        attrs = sample_attrs(domain, rng_attrs)
        out.append(Sample(_DRAW[domain](attrs, rng_draw), caption(domain, attrs, rng_text, split), attrs))
    return out


def labeled_prompts(split: Split = "heldout", n_per_domain: int = 50, seed: int = 0) -> list[dict[str, str]]:
    """Distinct prompts labelled with their domain, `[{"prompt": ..., "expert": domain}]`, for routers."""
    out = []
    for domain in DOMAINS:
        rng_attrs, rng_text = _rng(domain, seed, 6), _rng(domain, seed, {"train": 7, "heldout": 8, "rephrased": 10}[split])
        seen: set[str] = set()
        for _ in range(50 * n_per_domain):
            if len(seen) == n_per_domain:
                break
            text = caption(domain, sample_attrs(domain, rng_attrs), rng_text, split)
            if text not in seen:
                seen.add(text)
                out.append({"prompt": text, "expert": domain})
    return out


def write_dataset(domain: str, folder: str | Path, n: int, seed: int = 0, split: Split = "train") -> Path:
    """Write `n` samples of `domain` as `NNNN.png` + `NNNN.txt` (kohya layout), plus `attrs.jsonl`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    digits = max(4, len(str(n - 1)))
    rows = []
    for i, s in enumerate(generate(domain, n, seed, split)):
        stem = f"{i:0{digits}d}"
        s.image.save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(s.caption + "\n", encoding="utf-8")
        rows.append(json.dumps({"file": f"{stem}.png", "caption": s.caption, **s.attrs}))
    (folder / "attrs.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder
