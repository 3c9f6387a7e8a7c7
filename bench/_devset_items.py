"""The items of the development set (bench/devset.py scores them), generated from seeds.

Four families, each at a few sizes, every item checkable by string or number:

- `needle`: one line holding a code word hidden in filler text (2k, 8k, 32k characters);
- `logcount`: how many ERROR lines a service wrote in a generated log (200, 800 lines);
- `csvagg`: a sum or an arg-max over a generated CSV of orders;
- `oolong`: OOLONG-style labelling and counting: short messages whose topic follows from
  their words (food, sport, weather, travel), and a question that needs every label.

`items(split)` gives the "dev" items (tune prompts and guards on these) or the
"heldout" items (report only; never tuned on). The same seed always gives the same item,
so the scores in docs/rlm.md can be reproduced exactly.

    python bench/_devset_items.py     # list the items with their sizes and answers
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Literal

Split = Literal["dev", "heldout"]


@dataclass(frozen=True)
class Item:
    name: str
    family: str
    split: Split
    query: str
    context: str
    answer: str

    @property
    def chars(self) -> int:
        return len(self.context)


_FILLER_TEXT = (
    "the river bends past old mills where the path turns toward quiet fields and a bridge "
    "crosses slow water while birds settle on fences near the barn at evening light"
)
_FILLER_WORDS = _FILLER_TEXT.split()


def _filler_line(rng: random.Random) -> str:
    return " ".join(rng.choice(_FILLER_WORDS) for _ in range(rng.randint(8, 14))).capitalize() + "."


def needle(seed: int, chars: int, split: Split) -> Item:
    rng = random.Random(seed)
    code = f"{rng.choice('BCDFGHJKLMNPQRSTVWXZ')}{rng.randint(100, 999)}-{rng.choice(['amber', 'cobalt', 'ivory', 'jade', 'onyx'])}"
    lines: list[str] = []
    while sum(len(ln) + 1 for ln in lines) < chars:
        lines.append(_filler_line(rng))
    position = rng.randint(len(lines) // 5, len(lines) - 2)
    lines.insert(position, f"Note for the archive: the access code for vault seven is {code}.")
    return Item(
        f"needle-{chars // 1000}k-s{seed}", "needle", split,
        "What is the access code for vault seven?", "\n".join(lines), code,
    )  # fmt: skip


_SERVICES = ("api", "auth", "billing", "search")


def logcount(seed: int, n_lines: int, split: Split) -> Item:
    rng = random.Random(seed)
    target = rng.choice(_SERVICES)
    levels = ["INFO"] * 7 + ["WARN"] * 2 + ["ERROR"] * 2
    lines = []
    count = 0
    for i in range(n_lines):
        service = rng.choice(_SERVICES)
        level = rng.choice(levels)
        if service == target and level == "ERROR":
            count += 1
        msg = {"INFO": "request ok", "WARN": "slow response", "ERROR": "request failed"}[level]
        lines.append(
            f"2026-11-{1 + i // 400:02d} {8 + (i // 60) % 12:02d}:{i % 60:02d}:{rng.randint(0, 59):02d} "
            f"{level} service={service} id={rng.randint(10000, 99999)} {msg}"
        )
    return Item(
        f"logcount-{n_lines}-s{seed}", "logcount", split,
        f"How many ERROR lines did the {target} service write?", "\n".join(lines), str(count),
    )  # fmt: skip


_REGIONS = ("north", "south", "east", "west")
_PRODUCTS = ("lamp", "chair", "desk", "shelf", "rug")


def csvagg(seed: int, n_rows: int, kind: str, split: Split) -> Item:
    rng = random.Random(seed)
    rows = ["order_id,region,product,units,unit_price"]
    units_by_region: dict[str, int] = dict.fromkeys(_REGIONS, 0)
    revenue: dict[str, int] = dict.fromkeys(_PRODUCTS, 0)
    for i in range(n_rows):
        region, product = rng.choice(_REGIONS), rng.choice(_PRODUCTS)
        units, price = rng.randint(1, 20), rng.randint(5, 60)
        units_by_region[region] += units
        revenue[product] += units * price
        rows.append(f"{1000 + i},{region},{product},{units},{price}")
    if kind == "sum":
        region = rng.choice(_REGIONS)
        query = f"How many units were sold in total in the {region} region?"
        answer = str(units_by_region[region])
    else:
        query = "Which product brought in the most revenue (units times unit_price)?"
        answer = max(revenue, key=lambda p: revenue[p])
    return Item(f"csv-{kind}-{n_rows}-s{seed}", "csvagg", split, query, "\n".join(rows), answer)


_TOPICS: dict[str, tuple[str, ...]] = {
    "food": ("the soup was too salty", "we baked fresh bread", "this pasta needs garlic",
             "lunch was a great curry", "the cake recipe uses butter"),
    "sport": ("our team won the match", "he scored a late goal", "the marathon starts at nine",
              "tennis practice ran long", "the referee stopped the game"),
    "weather": ("heavy rain all afternoon", "the forecast says snow", "a cold wind from the north",
                "sunny skies after the storm", "fog covered the valley"),
    "travel": ("our train was delayed", "the flight lands at six", "we booked a hotel by the sea",
               "the ferry crossing was rough", "passport control took an hour"),
}  # fmt: skip


def oolong(seed: int, n_msgs: int, split: Split) -> Item:
    rng = random.Random(seed)
    topics = list(_TOPICS)
    counts = dict.fromkeys(topics, 0)
    lines = []
    for i in range(n_msgs):
        topic = rng.choice(topics)
        counts[topic] += 1
        user = rng.randint(100, 999)
        lines.append(f"[msg {i + 1}] user {user}: {rng.choice(_TOPICS[topic]).capitalize()}.")
    if seed % 2:
        target = rng.choice(topics)
        query = (
            f"Each message is about one topic: food, sport, weather or travel. "
            f"How many messages are about {target}?"
        )
        answer = str(counts[target])
    else:
        query = (
            "Each message is about one topic: food, sport, weather or travel. "
            "Which topic has the most messages?"
        )
        best = max(counts.values())
        if list(counts.values()).count(best) > 1:  # keep the answer unique: add one message
            target = max(counts, key=lambda t: counts[t])
            counts[target] += 1
            lines.append(f"[msg {n_msgs + 1}] user 101: {_TOPICS[target][0].capitalize()}.")
        answer = max(counts, key=lambda t: counts[t])
    return Item(f"oolong-{n_msgs}-s{seed}", "oolong", split, query, "\n".join(lines), answer)


def items(split: Split | None = None) -> list[Item]:
    """The whole set (12 items: 8 dev, 4 held out), or one split of it.

    Twelve, not more: on the shared 2-core machine one RLM item takes minutes."""
    every = [  # one item of each family first: on a busy machine a run may not finish
        needle(1, 2_000, "dev"),
        logcount(4, 200, "dev"),
        csvagg(6, 60, "sum", "dev"),
        oolong(8, 40, "dev"),
        csvagg(7, 200, "argmax", "dev"),
        oolong(9, 120, "dev"),
        needle(3, 32_000, "dev"),
        logcount(5, 800, "dev"),
        # held out: never looked at while tuning prompts and guards
        csvagg(13, 120, "sum", "heldout"),
        oolong(16, 60, "heldout"),
        needle(11, 16_000, "heldout"),
        logcount(12, 600, "heldout"),
    ]
    return [i for i in every if split is None or i.split == split]


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize(text: str) -> str:
    return " ".join(text.strip().strip("`'\".").lower().split())


def is_correct(answer: str, expected: str) -> bool:
    """Exact after normalising; a numeric answer must be the only number given; a word
    answer may sit in a short phrase ("The product is desk")."""
    got, want = normalize(answer), normalize(expected)
    if not got:
        return False
    if got == want:
        return True
    if _NUMBER.fullmatch(want):
        numbers = [n.replace(",", "") for n in _NUMBER.findall(got)]
        return numbers == [want.replace(",", "")]
    return re.search(rf"\b{re.escape(want)}\b", got) is not None and len(got) <= len(want) + 40


if __name__ == "__main__":
    for item in items():
        print(f"{item.split:8} {item.name:24} {item.chars:7,} chars  answer={item.answer!r}")
        print(f"{'':8} {item.query}")
