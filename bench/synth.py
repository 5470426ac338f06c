"""Synthetic GSM8K-like training data with planted duplicates, for the data-plane bench and its test.

Questions come from templates: by default the 7,473 GSM8K train questions with their numbers and
person names turned into slots (so 1M rows are ~130 re-numbered, re-named variants of each, much like a
teacher's "similar questions"), often with a context sentence added; without the GSM8K file, from ~30
built-in word-problem templates. Answers end in ``#### <n>``. A share of rows are planted copies of earlier rows:
- exact: the same question up to case, spacing and punctuation (``_norm``-equal: the filter's "duplicate");
- near: one or two words substituted, inserted or deleted, checked to score ROUGE-L F1 >= the threshold
  with the original (the filter's "near_duplicate").
Rows carry the DATASET lineage columns: seed rows, then teacher rows of iterations 0..k whose parent is
a row of an earlier iteration, so parent chains are several levels deep.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from rapidfuzz.distance import Indel

from llm2llm.schemas import DATASET, row_id
from llm2llm_jobs.filter import _Tokens

_SYL = ("ka ri na to mi lo sa be da el jo an mar te li vi ro se fa nu go ha ze pe qui wi yo du ce bo "
        "ra len tor ish ven ly ana ette").split()
_ITEMS = ("apples pencils cookies marbles stickers books cupcakes oranges balloons crayons shells stamps "
          "cards candles muffins pies tomatoes carrots eggs bottles boxes bags toys cars trucks dolls "
          "puzzles games blocks coins rings bracelets necklaces shirts socks hats scarves gloves shoes "
          "plates cups bowls spoons forks chairs tables lamps rugs pillows blankets towels flowers roses "
          "tulips plants trees seeds bees ducks chickens cows goats sheep horses fish frogs kittens puppies "
          "rabbits birds feathers stones bricks planks nails screws bolts tiles bananas pears peaches plums "
          "lemons limes melons grapes cherries berries nuts almonds peanuts donuts bagels pretzels sandwiches "
          "pizzas burgers tacos lollipops chocolates candies notebooks folders erasers markers rulers "
          "stickers tickets magazines comics posters paintings photos postcards letters").split()
_ADJ = ("red blue green yellow small large fresh old new shiny wooden plastic golden striped spotted "
        "tiny huge sweet sour round square heavy light cheap fancy").split()
_PLACES = ("market school bakery library park zoo farm store mall garden beach museum cafe gym office "
           "fair circus harbor station stadium theater kitchen garage attic camp island village town "
           "city forest lake river shop pharmacy clinic bank hotel").split()
_UNITS = "days weeks hours months minutes years".split()
_FILLERS = (
    "On {day}, {name2} came along to help.", "It was a sunny morning in the {place2} near {town}.",
    "{name2} thinks {n3} {item2} is a lot.", "The weather in {town} was cold that week.",
    "{name2} had planned this for {n3} {unit}.", "This happened at the {place2} near the {place} in {town}.",
    "Some of the {item2} were {adj2}.", "The trip from {town} took {n3} {unit} in total.",
    "{name2} kept a careful record in a {adj2} notebook.", "{name2} lives {n3} miles away in {town}.",
    "Last year {name2} did the same with {n3} {item2}.", "{name2} paid ${n3} for lunch on {day}.",
    "The {place2} in {town} opens at {hour} o'clock.", "{name2} brought {n3} {adj2} {item2} as well.",
    "They met {name2} at the {place2} on {day}.", "{name2} has a {adj2} dog called {pet}.",
)
_QUESTIONS = ("How many {what} {verb} in all?", "How many {what} {verb} altogether?",
              "What is the total number of {what} that {verb}?", "Find how many {what} {verb}.",
              "Can you work out how many {what} {verb}?")
_DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
_TOWNS = ("Springfield Riverside Fairview Lakeside Oakwood Hillcrest Maplewood Brookfield Greenville "
          "Ashford Clearwater Westfield Eastwood Northgate Southport Milton Bristol Dover Kent Avalon").split()
_PETS = "Max Bella Rocky Luna Daisy Milo Coco Buddy Ruby Ziggy Pepper Biscuit".split()
# {q} is a question sentence from _QUESTIONS about {what}/{verb}.
_TEMPLATES = (
    ("{name} has {n1} {item}. {name2} gives {name} {n2} more {item} and {n3} {item2}.", "{item}", "does {name} have"),
    ("{name} buys {n1} packs of {adj} {item} at the {place} in {town}. Each pack has {n2} {item}.", "{item}", "does {name} buy"),
    ("A {place} in {town} sells {item} for ${p} each. {name} buys {n1} of them and {name2} buys {n2}.", "dollars", "do they spend"),
    ("{name} reads {n1} pages of a {adj} book about {item} every day for {n2} {unit}.", "pages", "does {name} read"),
    ("There are {n1} {adj} {item} in a box at the {place}. {name} takes {n2} and {name2} takes {n3}.", "{item}", "are left in the box"),
    ("{name} earns ${p} per hour at the {place} in {town}. {name} works {n1} hours on {day} and {n2} hours the next day.", "dollars", "does {name} earn"),
    ("{name} collects {item}. {name} has {n1} {adj} {item} and {n2} {adj2} {item}, and {name2} has {n3} fewer.", "{item}", "does {name2} have"),
    ("A farmer called {name} plants {n1} rows of {item} near the {place} with {n2} in each row, and {n3} of them do not grow.", "{item}", "grow"),
    ("{name} runs {n1} miles every day for {n2} {unit} around {town}, while {name2} runs {n3} miles in the same time.", "more miles", "does {name} run"),
    ("{name} bakes {n1} {item} for the {place} in {town} and sells {pct}% of them to {name2}.", "{item}", "are left"),
    ("{name} counts {n1} visitors at the {place} in {town} on {day} and {n2} more on the next day.", "visitors", "come on both days"),
    ("{name} saves ${n1} a week for {n2} {unit} to buy {adj} {item} that cost ${p} each.", "{item}", "can {name} buy"),
    ("{name} and {name2} share {n1} {item} from the {place} so that {name} gets {n2} more than {name2}.", "{item}", "does {name2} get"),
    ("A bus from {town} to the {place} carries {n1} people. At the first stop {n2} get off and {n3} get on, including {name}.", "people", "are on the bus"),
    ("{name} fills {n1} bags with {n2} {adj} {item} each and gives {n3} bags to {name2} in {town}.", "{item}", "does {name} keep"),
    ("In a class of {n1} students at the {place} in {town}, {pct}% like {item} and {name} likes {item2}.", "students", "do not like {item}"),
    ("{name} spends ${n1} on {item} and ${n2} on {item2} at the {place}, after starting with ${n3}.", "dollars", "are left"),
    ("A recipe from {name} needs {n1} cups of flour for {n2} {item}, and {name2} wants {n3} {item}.", "cups", "does {name2} need"),
    ("{name} walks {n1} blocks to the {place}, then {n2} blocks to the {place2}, then {n3} blocks home to {town}.", "blocks", "does {name} walk"),
    ("The {place} in {town} orders {n1} crates of {item} with {n2} in each crate, and {name} finds {n3} {adj} ones.", "{item}", "are not {adj}"),
    ("{name} is {n1} years old and {name2} is {n2} years older, and they live in {town} with {pet}.", "years", "will {name2} be in {n3} years"),
    ("{name} paints {n1} {item} each hour for {n2} hours at the {place}, and {name2} paints {n3} in total.", "{item}", "do they paint together"),
    ("A tank at the {place} in {town} holds {n1} liters and leaks {n2} liters a day for {n3} {unit}, says {name}.", "liters", "are left"),
    ("{name} cuts a ribbon {n1} inches long into pieces of {n2} inches to tie {n3} {adj} {item}.", "pieces", "does {name} get"),
    ("{name} gets {n1} {item} on {day}, twice as many on the next day and {n2} on the third day from {name2}.", "{item}", "does {name} get"),
    ("Tickets for the {place} in {town} cost ${p} for adults and ${n1} for kids, and {name} buys {n2} adult and {n3} kid tickets.", "dollars", "does {name} pay"),
    ("{name} has {n1} {item} and {n2} {item2}, and gives {pct}% of the {item} to {name2} at the {place}.", "things", "does {name} have"),
    ("{name} types {n1} words a minute and has {n2} words to type for the {place} report due on {day}.", "minutes", "does it take"),
    ("A shop at the {place} in {town} sold {n1} {adj} {item} in the morning and {n2} in the afternoon for ${p} each.", "dollars", "did it make"),
    ("{name} plants {n1} {item} in the garden in {town}, and each one needs {n2} liters of water a day for {n3} {unit}.", "liters", "are needed"),
)
GSM8K_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
_NUM = re.compile(r"\d+(?:\.\d+)?")
_CAP = re.compile(r"(?<![.?!]\s)(?<!^)\b[A-Z][a-z]{2,}\b")
_ITEM_RE = re.compile(r"\b(?:" + "|".join(sorted(set(_ITEMS), key=len, reverse=True)) + r")\b")
_ANYCAP = re.compile(r"\b[A-Z][a-z]{2,}\b")
_NOT_NAMES = set(_DAYS) | set("January February March April May June July August September October November "
                              "December I The A An If In On At How What When Each Every After Before".split())


def _gsm8k_templates(path: Path) -> list[tuple[str, list[str]]]:
    """(format string, slot kinds) per question: numbers become 'n<digits>[.<decimals>]' slots and
    mid-sentence capitalised words 'name<k>' slots (the same name -> the same slot)."""
    out = []
    for line in path.read_text().splitlines():
        q = json.loads(line)["question"].replace("{", "(").replace("}", ")")
        slots: list[str] = []
        names: dict[str, int] = {}

        def number(m: re.Match) -> str:
            whole, _, frac = m.group(0).partition(".")
            slots.append(f"n{len(whole)}" + (f".{len(frac)}" if frac else ""))
            return "{%d}" % (len(slots) - 1)

        def name(m: re.Match) -> str:
            w = m.group(0)
            if w not in found:
                return w
            if w not in names:
                names[w] = len(names)
            slots.append(f"name{names[w]}")
            return "{%d}" % (len(slots) - 1)

        def item(m: re.Match) -> str:
            w = m.group(0)
            if w not in items:
                items[w] = len(items)
            slots.append(f"item{items[w]}")
            return "{%d}" % (len(slots) - 1)

        # Names: capitalised words seen mid-sentence somewhere; then every occurrence is a slot. Plural
        # nouns from the item list are slots too (a teacher's variant changes the objects as well).
        found = {w for w in _CAP.findall(q) if w not in _NOT_NAMES}
        items: dict[str, int] = {}
        q = _ANYCAP.sub(name, _NUM.sub(number, q))
        out.append((_ITEM_RE.sub(item, q), slots))
    return out


def _gsm8k_questions(rng: np.random.Generator, n: int, path: Path) -> tuple[list[str], list[str]]:
    templates = _gsm8k_templates(path)
    names = _names(rng, 6000)
    pick = rng.integers(0, len(templates), n)
    nfill = rng.choice(3, n, p=[0.1, 0.6, 0.3])
    fills = rng.integers(0, len(_FILLERS), (n, 2))
    item_draw = rng.integers(0, len(_ITEMS), n)
    name_draw = rng.integers(0, len(names), (n, 4))
    filler_slots = {"day": _DAYS, "town": _TOWNS, "pet": _PETS, "place": _PLACES, "place2": _PLACES,
                    "item2": _ITEMS, "adj2": _ADJ, "unit": _UNITS}
    draws = {k: rng.integers(0, len(v), n) for k, v in filler_slots.items()}
    n3, hour = _number(rng, n), rng.integers(6, 12, n)
    qs, outs = [], []
    for k in range(n):
        fmt, kinds = templates[pick[k]]
        values = []
        for kind in kinds:
            if kind.startswith("name"):
                values.append(names[name_draw[k, int(kind[4:]) % 4]])
            elif kind.startswith("item"):
                values.append(_ITEMS[(item_draw[k] + 7 * int(kind[4:])) % len(_ITEMS)])
            else:
                digits, _, frac = kind[1:].partition(".")
                lo = 10 ** (int(digits) - 1) if int(digits) > 1 else 1
                v = str(int(rng.integers(lo, 10 ** int(digits))))
                values.append(v + ("." + str(int(rng.integers(0, 10 ** int(frac)))).zfill(int(frac)) if frac else ""))
        q = fmt.format(*values)
        if nfill[k]:
            slots = {key: filler_slots[key][draws[key][k]] for key in filler_slots}
            slots.update(name2=names[name_draw[k, 3]], n3=n3[k], hour=hour[k])
            q = " ".join(_FILLERS[f].format(**slots) for f in fills[k, : nfill[k]]) + " " + q
        qs.append(q)
        answer = values[0] if values else "1"
        outs.append(f"The answer is {answer}.\n#### {answer}")
    return qs, outs


_EDIT_WORDS = "really also then still just quickly later again only nearly".split()


def _names(rng: np.random.Generator, count: int) -> list[str]:
    out: set[str] = set()
    while len(out) < count:
        k = int(rng.integers(2, 4))
        out.add("".join(_SYL[int(i)] for i in rng.integers(0, len(_SYL), k)).capitalize())
    return sorted(out)


def _number(rng: np.random.Generator, size: int) -> np.ndarray:
    """GSM8K-ish numbers: mostly small, some large."""
    band = rng.random(size)
    small = rng.integers(2, 21, size)
    mid = rng.integers(21, 201, size)
    big = rng.integers(201, 5001, size)
    return np.where(band < 0.5, small, np.where(band < 0.8, mid, big))


@dataclass
class Synthetic:
    table: pa.Table  # DATASET schema, rows in order
    exact: np.ndarray  # (k, 2) planted (original row, exact copy row)
    near: np.ndarray  # (k, 2) planted (original row, near copy row)
    near_scores: np.ndarray  # ROUGE-L F1 of each planted near pair
    split: int  # rows [0, split) are D (existing data), [split, n) are A (the new rows)


def _questions(rng: np.random.Generator, n: int) -> tuple[list[str], list[str]]:
    names = _names(rng, 6000)
    items = _ITEMS
    t = rng.integers(0, len(_TEMPLATES), n)
    qv = rng.integers(0, len(_QUESTIONS), n)
    name_i, name2_i = rng.integers(0, len(names), n), rng.integers(0, len(names), n)
    item_i, item2_i = rng.integers(0, len(items), n), rng.integers(0, len(items), n)
    adj_i, adj2_i = rng.integers(0, len(_ADJ), n), rng.integers(0, len(_ADJ), n)
    place_i, place2_i = rng.integers(0, len(_PLACES), n), rng.integers(0, len(_PLACES), n)
    unit_i, day_i = rng.integers(0, len(_UNITS), n), rng.integers(0, len(_DAYS), n)
    town_i, pet_i = rng.integers(0, len(_TOWNS), n), rng.integers(0, len(_PETS), n)
    n1, n2, n3 = _number(rng, n), _number(rng, n), _number(rng, n)
    hour = rng.integers(6, 12, n)
    cents = rng.integers(0, 4, n) * 25
    pct = rng.integers(1, 20, n) * 5
    nfill = rng.choice(4, n, p=[0.15, 0.45, 0.3, 0.1])
    fills = rng.integers(0, len(_FILLERS), (n, 3))
    before = rng.random(n) < 0.5
    qs, outs = [], []
    for k in range(n):
        slots = {
            "name": names[name_i[k]], "name2": names[name2_i[k]], "item": items[item_i[k]],
            "item2": items[item2_i[k]], "adj": _ADJ[adj_i[k]], "adj2": _ADJ[adj2_i[k]],
            "place": _PLACES[place_i[k]], "place2": _PLACES[place2_i[k]], "unit": _UNITS[unit_i[k]],
            "day": _DAYS[day_i[k]], "town": _TOWNS[town_i[k]], "pet": _PETS[pet_i[k]], "hour": hour[k],
            "n1": n1[k], "n2": n2[k], "n3": n3[k], "pct": pct[k],
            "p": f"{n2[k] % 50 + 1}.{cents[k]:02d}" if cents[k] else str(n2[k] % 50 + 1),
        }
        body, what, verb = _TEMPLATES[t[k]]
        question = _QUESTIONS[qv[k]].format(what=what, verb=verb).format(**slots)
        extra = " ".join(_FILLERS[f].format(**slots) for f in fills[k, : nfill[k]])
        body = body.format(**slots)
        q = " ".join(x for x in ((extra, body) if before[k] else (body, extra)) if x) + " " + question
        total = int(n1[k]) + int(n2[k])
        qs.append(q)
        outs.append(f"{slots['name']} has {n1[k]} + {n2[k]} = {total}.\n#### {total}")
    return qs, outs


def _exact_variant(rng: np.random.Generator, q: str) -> str:
    kind = int(rng.integers(0, 4))
    if kind == 0:
        return q
    if kind == 1:
        return q.upper() if rng.random() < 0.5 else q.lower()
    if kind == 2:
        return "  ".join(q.split(" ")).replace("?", " ?")
    return q.rstrip("?.!") + "!!"


def _near_variant(rng: np.random.Generator, tok: _Tokens, q: str, threshold: float) -> tuple[str, float] | None:
    words = q.split(" ")
    base = tok.encode(q)
    for _ in range(8):
        w = list(words)
        edits = 2 if len(base) >= 48 and rng.random() < 0.5 else 1
        for _ in range(edits):
            op = rng.random()
            pos = int(rng.integers(0, len(w)))
            new = _EDIT_WORDS[int(rng.integers(0, len(_EDIT_WORDS)))]
            if op < 0.5 and w[pos].isalpha() and w[pos].lower() != new:
                w[pos] = new
            elif op < 0.8:
                w.insert(pos, new)
            elif len(w) > 2 and w[pos].isalpha():
                del w[pos]
            else:
                w.insert(pos, new)
        cand = " ".join(w)
        enc = tok.encode(cand)
        if enc == base:
            continue
        score = Indel.normalized_similarity(base, enc)
        if score >= threshold:
            return cand, score
    return None


def synthesize(n: int, *, seed: int = 0, exact_rate: float = 0.02, near_rate: float = 0.02, threshold: float = 0.95,
               seed_share: float = 0.1, iterations: int = 4, templates: str = "auto") -> Synthetic:
    """``n`` rows: about ``exact_rate`` and ``near_rate`` of them planted copies of an earlier row.
    ``templates``: 'gsm8k' (the GSM8K train questions), 'builtin', or 'auto' (gsm8k when present)."""
    rng = np.random.default_rng(seed)
    if templates == "gsm8k" or (templates == "auto" and GSM8K_TRAIN.is_file()):
        qs, outs = _gsm8k_questions(rng, n, GSM8K_TRAIN)
    else:
        qs, outs = _questions(rng, n)
    tok = _Tokens()
    kind = rng.random(n)
    kind[: min(n, 100)] = 1.0  # the first rows are originals
    exact, near, scores = [], [], []
    planted = np.zeros(n, bool)
    for k in np.flatnonzero(kind < exact_rate + near_rate):
        k = int(k)
        while True:  # an earlier original
            src = int(rng.integers(0, k))
            if not planted[src]:
                break
        if kind[k] < exact_rate:
            qs[k], outs[k] = _exact_variant(rng, qs[src]), outs[src]
            exact.append((src, k))
        else:
            made = _near_variant(rng, tok, qs[src], threshold)
            if made is None:
                continue
            qs[k], outs[k] = made[0], outs[src]
            near.append((src, k))
            scores.append(made[1])
        planted[k] = True
    # Lineage: seed rows first, then one band per teacher iteration; a teacher row's parent is a row of
    # an earlier band, so chains reach back to the seed through several iterations.
    n_seed = max(1, int(n * seed_share))
    bounds = np.linspace(n_seed, n, iterations + 1).astype(np.int64)
    ids = [row_id(q, o) for q, o in zip(qs, outs)]
    parent: list[str | None] = [None] * n
    iteration: list[int | None] = [None] * n
    for it in range(iterations):
        lo, hi = int(bounds[it]), int(bounds[it + 1])
        prev_lo = 0 if it == 0 else int(bounds[it - 1])
        picks = rng.integers(prev_lo, lo, hi - lo)
        for off, p in enumerate(picks.tolist()):
            parent[lo + off] = ids[p]
            iteration[lo + off] = it
    source = ["seed"] * n_seed + ["teacher"] * (n - n_seed)
    teacher = [None] * n_seed + ["smollm2-135m"] * (n - n_seed)
    phash = [None] * n_seed + ["0123456789abcdef"] * (n - n_seed)
    table = pa.Table.from_arrays(
        [pa.array(ids), pa.array(parent, pa.string()), pa.array(iteration, pa.int32()), pa.array(source),
         pa.array(teacher, pa.string()), pa.array(phash, pa.string()), pa.array(qs), pa.array(outs)],
        schema=DATASET,
    )
    split = int(bounds[iterations // 2]) if iterations > 1 else n // 2
    return Synthetic(table, np.array(exact, np.int64).reshape(-1, 2), np.array(near, np.int64).reshape(-1, 2),
                     np.array(scores, np.float64), split)
