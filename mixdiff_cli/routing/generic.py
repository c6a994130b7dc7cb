"""Generic captions: prompts about everyday subjects that no particular expert is for, written by code
(no download). The router learns "none of these" from them and calibrates its abstention against them:

    generic_captions()   # ["a photo of an old fisherman", "a bowl of noodles on a wooden table", ...]

They are negatives for any catalog, so those too close to an expert's own texts (an expert *for* cats
makes "a cat on a sofa" its own) are dropped per catalog (`negatives`).

Import-light: no torch here.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from mixdiff_cli.routing.encoders import Encoder

SEED = 20261207
SUBJECTS = """an old fisherman|a young woman|a smiling child|a bearded man|a street musician|a chef in a kitchen|a ballet dancer|
a soldier|a nurse|an astronaut|a knight in armour|a farmer|a businessman in a suit|a grandmother knitting|a surfer|a cowboy|
a tabby cat|a golden retriever|a horse in a field|an owl|a red fox|a herd of elephants|a tiger|a parrot|a goldfish|a butterfly|
a bowl of ramen|a plate of spaghetti|a cup of coffee|a slice of pizza|a chocolate cake|a bowl of fruit|a hamburger|sushi|
a glass of wine|fresh bread|a sports car|a vintage motorcycle|a steam train|a sailboat|a city bus|a bicycle|an airplane|
a pickup truck|a medieval castle|a lighthouse|a skyscraper|a wooden cabin|a cathedral|a bridge|a farmhouse|a temple|
a crowded market|a subway station|a library|a classroom|a hospital corridor|a football stadium|a living room|an office|
a leather armchair|a pair of sneakers|a wristwatch|a smartphone|an old typewriter|a guitar|a teddy bear|a vase of flowers|
a bonsai tree|a sunflower|a cactus|a rose|an oak tree|a mushroom|a dragon|a robot|a spaceship|a wizard|a mermaid|a unicorn""".split("|")
PLACES = """on a wooden table|in a busy street|in the rain|at a train station|in a forest|on a city rooftop|in a cozy kitchen|
at the harbour|in a museum|on a balcony|in a garden|at a concert|in a desert town|on a mountain trail|in a bedroom|
at the airport|in the fog|by a river|in a snowy village|at a night market""".split("|")
FORMS = [
    "{s}", "a photo of {s}", "a portrait of {s}", "{s} {p}", "a photo of {s} {p}", "a close-up of {s}", "an oil painting of {s}",
    "a sketch of {s}", "a watercolor of {s} {p}", "a 3d render of {s}", "a cinematic shot of {s} {p}", "an illustration of {s}",
    "a black and white photo of {s}", "a cartoon of {s}", "a detailed drawing of {s} {p}", "{s}, highly detailed, 4k",
    "a vintage postcard of {s}", "a children's book illustration of {s} {p}",
]
_LETTERS = "bcdfghjklmnpqrstvwxz"


def _nonsense(rng: random.Random, n: int) -> list[str]:
    """`n` strings of made-up words ("qzv kdrt"): prompts no encoder has evidence for."""
    words = lambda: "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 7)))  # noqa: E731
    return [" ".join(words() for _ in range(rng.randint(1, 4))) for _ in range(n)]


def generic_captions(n: int = 480, seed: int = SEED) -> list[str]:
    """`n` distinct generic captions (subjects x places x picture forms), a few made-up words and the
    empty prompt among them; deterministic in `seed`."""
    rng = random.Random(seed)
    subjects = [s.strip() for s in SUBJECTS]
    places = [p.strip() for p in PLACES]
    out: dict[str, None] = {"": None}
    out.update(dict.fromkeys(_nonsense(rng, max(1, n // 12))))
    while len(out) < n:
        form = rng.choice(FORMS)
        out[form.format(s=rng.choice(subjects), p=rng.choice(places))] = None
    return list(out)[:n]


def negatives(expert_vecs: torch.Tensor, owner: torch.Tensor, generic_vecs: torch.Tensor, sample: int = 2048, seed: int = 0) -> torch.Tensor:
    """(G,) bool: which generic captions stay negatives for this catalog. A caption is dropped when its
    nearest expert text (cosine of the raw, normalised embeddings) is as close as the median of that
    expert's texts to their own nearest neighbour, and as close as generic captions are to their nearest
    other caption (median): it reads like one of that expert's own prompts.
    `expert_vecs` (n, D), `owner` (n,) the expert of each, `generic_vecs` (G, D); at most `sample` expert
    texts are compared (seeded)."""
    import torch
    import torch.nn.functional as F

    if not len(expert_vecs) or not len(generic_vecs):
        return torch.ones(len(generic_vecs), dtype=torch.bool)
    if len(expert_vecs) > sample:
        pick = torch.randperm(len(expert_vecs), generator=torch.Generator().manual_seed(seed))[:sample]
        expert_vecs, owner = expert_vecs[pick], owner[pick]
    ex, gen = F.normalize(expert_vecs.float(), dim=-1), F.normalize(generic_vecs.float(), dim=-1)
    within = ex @ ex.T  # (n, n)
    same = owner[:, None] == owner[None, :]
    within = within.masked_fill(~same | torch.eye(len(ex), dtype=torch.bool), -2.0)
    own_nn = within.max(-1).values  # (n,) each text's nearest other text of its expert (-2: alone)
    medians = torch.full((int(owner.max()) + 1,), 2.0)
    for e in owner.unique().tolist():
        mine = own_nn[(owner == e) & (own_nn > -2)]
        if len(mine):
            medians[e] = mine.median()
    # and never below how alike generic captions are to each other: experts whose own texts share few
    # words (a median of 0) would otherwise claim every caption
    among = (gen @ gen.T).fill_diagonal_(-2.0).max(-1).values.median() if len(gen) > 1 else torch.tensor(-1.0)
    cross = gen @ ex.T  # (G, n)
    nearest, at = cross.max(-1)
    return nearest < torch.maximum(medians[owner[at]], among)


def split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of `n` negatives for training and for calibration (at least one each when n >= 2)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = 0 if n < 2 else min(n - 1, max(1, round(val_fraction * n)))
    return sorted(order[n_val:]), sorted(order[:n_val])


def noisy(texts: Sequence[str], seed: int = SEED, replace: float = 1 / 3) -> list[str]:
    """Each text with words the router has never seen: one in three of its words (at least one) replaced
    by a made-up word, and one or two more inserted. An expert's prompt in an unseen wording keeps a part
    of its words; training on these teaches the gate that the part it knows still points to the expert."""
    rng = random.Random(seed)
    out = []
    for text in texts:
        words = text.split()
        fresh = _nonsense(rng, 3)
        for i in rng.sample(range(len(words)), k=max(1, int(len(words) * replace))) if len(words) > 1 and replace > 0 else []:
            words[i] = fresh[0].split()[0] if i % 2 else fresh[1].split()[0]
        for _ in range(rng.randint(1, 2)):
            words.insert(rng.randint(0, len(words)), fresh[2].split()[0])
        out.append(" ".join(words))
    return out


def negative_vectors(encoder: Encoder, expert_vecs: torch.Tensor, owner: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, calibration) vectors of the generic captions, embedded by `encoder`, that stay
    negatives for experts whose texts embed to `expert_vecs` (owner: the expert of each), split 75/25."""
    g = encoder(generic_captions())
    g = g[negatives(expert_vecs, owner, g, seed=seed)]
    train_i, val_i = split(len(g), 0.25, seed)
    return g[train_i], g[val_i]
