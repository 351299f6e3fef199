"""Invented facts: QA data that no model can answer from what it already knows.

Every paragraph is built from made-up names (people, places, organisations, objects), numbers
and dates drawn from a seeded random generator, so the only way to answer its questions is to
read the paragraph. Every answer is an exact span of the paragraph. This is the check that tells
whether a compressed chunk carries the *facts* of a text (names, numbers, dates), not only its
topic: on real text such as SQuAD, a model's prior knowledge answers part of the questions.

    >>> rows = invented_qa(n_paragraphs=2, seed=0)
    >>> all(r["answers"][0] in r["context"] for r in rows)
    True

Rows use the QA JSONL format of the evaluation (``id``, ``context``, ``question``, ``answers``),
so ``compressor-plugin eval make-invented --output f.jsonl`` followed by
``compressor-plugin eval qa --data f.jsonl`` evaluates any system on them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

__all__ = ["invented_qa", "write_invented_qa", "TEMPLATES"]

_ONSETS = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl",
           "kr", "pl", "st", "th", "tr", "vr", "sk"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou", "y"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m", "th", "nd", "rk"]
_PLACE_ENDS = ["ford", "mere", "vale", "holm", "stad", "ora", "wick", "bury", "dal", "grad", "mouth"]
_ORG_KINDS = ["Institute", "Cooperative", "Works", "Society", "Trust", "Foundry", "Academy", "Company"]
_FIELDS = ["chemistry", "geology", "music", "shipbuilding", "botany", "astronomy", "law", "medicine",
           "architecture", "mathematics", "weaving", "glassmaking"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]
_COLOURS = ["green", "amber", "violet", "grey", "scarlet", "white", "ochre", "blue"]
_ANIMALS = ["heron", "otter", "lynx", "falcon", "hare", "badger", "crane", "stag"]


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _word(rng: random.Random, lo: int = 2, hi: int = 3) -> str:
    return "".join(_syllable(rng) for _ in range(rng.randint(lo, hi)))


def _name(rng: random.Random) -> str:
    return f"{_word(rng, 2, 2).capitalize()} {_word(rng, 2, 3).capitalize()}"


def _place(rng: random.Random) -> str:
    return _word(rng, 1, 2).capitalize() + rng.choice(_PLACE_ENDS)


def _thing(rng: random.Random) -> str:
    return _word(rng, 2, 3)


def _number(rng: random.Random, lo: int, hi: int) -> str:
    return f"{rng.randint(lo, hi):,}"


def _date(rng: random.Random, lo: int = 1650, hi: int = 2080) -> tuple[str, str]:
    year = str(rng.randint(lo, hi))
    return f"{rng.randint(1, 28)} {rng.choice(_MONTHS)} {year}", year


QA = list[tuple[str, str]]


def _biography(rng: random.Random) -> tuple[str, QA]:
    name, born_in, died_in = _name(rng), _place(rng), _place(rng)
    first = name.split()[0]
    date, year = _date(rng, 1700, 1990)
    org = f"{_place(rng)} {rng.choice(_ORG_KINDS)}"
    field = rng.choice(_FIELDS)
    device = _thing(rng)
    staff = _number(rng, 12, 940)
    founded = str(int(year) + rng.randint(22, 40))
    street = _word(rng, 2, 2).capitalize()
    text = (f"{name} was born in {born_in} on {date}. After studying {field} at the {org}, {first} "
            f"worked for several years as an assistant before opening a workshop on {street} Street in "
            f"{founded}. The workshop employed {staff} people at its peak. {first} is best remembered for "
            f"the {device}, a small instrument that measured the moisture of grain. In later life "
            f"{first} moved to {died_in}, where the family still keeps a collection of letters.")
    qa = [(f"Where was {name} born?", born_in),
          (f"When was {name} born?", date),
          (f"What did {name} study at the {org}?", field),
          (f"In which year did {name} open a workshop?", founded),
          (f"How many people did the workshop on {street} Street employ at its peak?", staff),
          (f"What instrument is {name} best remembered for?", device),
          (f"Where did {name} move in later life?", died_in)]
    return text, qa


def _town(rng: random.Random) -> tuple[str, QA]:
    town, river, founder = _place(rng), _word(rng, 2, 2).capitalize(), _name(rng)
    pop = _number(rng, 1200, 480000)
    year = str(rng.randint(1100, 1900))
    dish = _thing(rng)
    colour = rng.choice(_COLOURS)
    animal = rng.choice(_ANIMALS)
    twin = _place(rng)
    text = (f"{town} is a market town on the banks of the {river} river. According to local records it "
            f"was founded in {year} by {founder}, a merchant who traded in salt and wool. Today {town} has "
            f"a population of {pop}. Its coat of arms shows a {colour} {animal} on a plain field. The town "
            f"is known for {dish}, a dish of baked barley and smoked fish that is served at the spring fair. "
            f"Since the last century {town} has been twinned with {twin}.")
    qa = [(f"On which river is {town}?", river),
          (f"When was {town} founded?", year),
          (f"Who founded {town}?", founder),
          (f"What is the population of {town}?", pop),
          (f"What animal is shown on the coat of arms of {town}?", f"{colour} {animal}"),
          (f"What dish is {town} known for?", dish),
          (f"Which town is {town} twinned with?", twin)]
    return text, qa


def _company(rng: random.Random) -> tuple[str, QA]:
    company = f"{_word(rng, 2, 2).capitalize()} {rng.choice(['Works', 'Company', 'Foundry'])}"
    city, ceo = _place(rng), _name(rng)
    year = str(rng.randint(1850, 2030))
    product = _thing(rng)
    revenue = _number(rng, 3, 900)
    staff = _number(rng, 40, 52000)
    rival = f"{_word(rng, 2, 2).capitalize()} {rng.choice(_ORG_KINDS)}"
    text = (f"The {company} is a manufacturer based in {city}. It was established in {year} and is led by "
            f"{ceo}, who became chief executive after a long career in logistics. The firm's best-selling "
            f"product is the {product}, a folding frame used by fruit growers. Last year the {company} "
            f"reported revenue of {revenue} million crowns and employed {staff} people. Its main competitor "
            f"is the {rival}, which makes a heavier frame from cast iron.")
    qa = [(f"Where is the {company} based?", city),
          (f"When was the {company} established?", year),
          (f"Who leads the {company}?", ceo),
          (f"What is the best-selling product of the {company}?", product),
          (f"How many people does the {company} employ?", staff),
          (f"What revenue did the {company} report last year?", f"{revenue} million crowns"),
          (f"What is the main competitor of the {company}?", rival)]
    return text, qa


def _expedition(rng: random.Random) -> tuple[str, QA]:
    leader, ship, peak = _name(rng), _word(rng, 2, 3).capitalize(), _word(rng, 2, 3).capitalize()
    start, year = _date(rng, 1750, 2060)
    crew = str(rng.randint(6, 95))
    height = _number(rng, 1200, 8800)
    days = str(rng.randint(11, 300))
    port = _place(rng)
    text = (f"In {year} an expedition led by {leader} set out to reach Mount {peak}. The party of {crew} "
            f"sailed from {port} aboard the ship {ship} on {start}. After {days} days of travel the climbers "
            f"reached the summit, which they measured at {height} metres. The journal kept by {leader} "
            f"describes storms, a lost supply boat and a long winter spent on the coast.")
    qa = [(f"Who led the expedition to Mount {peak}?", leader),
          (f"How many people were in the party that set out to reach Mount {peak}?", crew),
          (f"From which port did the expedition to Mount {peak} sail?", port),
          (f"What was the name of the expedition's ship?", ship),
          (f"On what date did the expedition to Mount {peak} sail?", start),
          (f"How high did the climbers measure Mount {peak} to be?", f"{height} metres"),
          (f"How many days did the expedition travel before reaching the summit?", days)]
    return text, qa


def _discovery(rng: random.Random) -> tuple[str, QA]:
    scientist, lab = _name(rng), f"{_place(rng)} {rng.choice(['Institute', 'Academy', 'Society'])}"
    mineral = _thing(rng)
    year = str(rng.randint(1780, 2070))
    temp = str(rng.randint(110, 2900))
    colleague = _name(rng)
    valley = _word(rng, 2, 2).capitalize()
    grams = str(rng.randint(2, 900))
    text = (f"The mineral {mineral} was first described in {year} by {scientist} of the {lab}. Samples "
            f"were collected in the {valley} valley, where it forms thin {rng.choice(_COLOURS)} crystals in "
            f"old lava. {mineral.capitalize()} melts at {temp} degrees and dissolves slowly in acid. "
            f"The first sample weighed only {grams} grams. Its structure was later solved by {colleague}, "
            f"a student of {scientist.split()[0]}, using a home-made diffraction camera.")
    qa = [(f"Who first described the mineral {mineral}?", scientist),
          (f"When was {mineral} first described?", year),
          (f"In which valley were samples of {mineral} collected?", valley),
          (f"At what temperature does {mineral} melt?", f"{temp} degrees"),
          (f"How much did the first sample of {mineral} weigh?", f"{grams} grams"),
          (f"Who solved the structure of {mineral}?", colleague),
          (f"Which institution was {scientist} part of?", lab)]
    return text, qa


def _club(rng: random.Random) -> tuple[str, QA]:
    club = f"{_place(rng)} {rng.choice(['Rovers', 'Athletic', 'Wanderers', 'United'])}"
    ground, coach, scorer = _word(rng, 2, 2).capitalize() + " Park", _name(rng), _name(rng)
    year = str(rng.randint(1860, 2040))
    seats = _number(rng, 900, 61000)
    goals = str(rng.randint(14, 61))
    titles = str(rng.randint(2, 19))
    colour = rng.choice(_COLOURS)
    text = (f"{club} is a football club founded in {year}. The club plays its home games at {ground}, "
            f"which holds {seats} spectators, and its players wear {colour} shirts. The team is coached by "
            f"{coach}. {club} has won the league {titles} times. Its record scorer is {scorer}, who scored "
            f"{goals} goals in a single season before moving abroad.")
    qa = [(f"When was {club} founded?", year),
          (f"Where does {club} play its home games?", ground),
          (f"How many spectators does {ground} hold?", seats),
          (f"Who coaches {club}?", coach),
          (f"How many times has {club} won the league?", titles),
          (f"Who is the record scorer of {club}?", scorer),
          (f"How many goals did {scorer} score in a single season?", goals)]
    return text, qa


#: The paragraph templates, by name.
TEMPLATES: dict[str, Callable[[random.Random], tuple[str, QA]]] = {
    "biography": _biography, "town": _town, "company": _company, "expedition": _expedition,
    "discovery": _discovery, "club": _club,
}


def invented_qa(n_paragraphs: int = 50, *, seed: int = 0, questions_per_paragraph: int = 3,
                paragraphs_per_chunk: int = 1) -> list[dict]:
    """QA rows about ``n_paragraphs`` invented paragraphs (templates in turn, seeded).

    Each paragraph gets ``questions_per_paragraph`` of its questions, chosen at random; every
    answer is an exact span of the paragraph's text.

    ``paragraphs_per_chunk`` > 1 joins that many consecutive paragraphs (blank line between) into
    one context, which every question of those paragraphs gets: a chunk then holds the names,
    numbers and dates of several paragraphs (three make about 350 tokens), more than an anchor
    budget of 32 tokens can spell out, so the compressed chunk must carry the one asked about.
    The paragraphs and questions are the same as with 1 (the same draws), only the contexts differ.
    """
    if n_paragraphs < 1:
        raise ValueError("n_paragraphs must be >= 1")
    if not 1 <= questions_per_paragraph <= 7:
        raise ValueError("questions_per_paragraph must be between 1 and 7")
    if paragraphs_per_chunk < 1:
        raise ValueError("paragraphs_per_chunk must be >= 1")
    rng = random.Random(seed)
    names = list(TEMPLATES)
    rows: list[dict] = []
    texts: list[str] = []
    for p in range(n_paragraphs):
        template = names[p % len(names)]
        text, qa = TEMPLATES[template](rng)
        texts.append(text)
        for q_i, (question, answer) in enumerate(rng.sample(qa, questions_per_paragraph)):
            if answer not in text:  # a template bug, never expected
                raise AssertionError(f"answer {answer!r} is not a span of the {template} paragraph")
            rows.append({"id": f"invented-{seed}-{p}-{q_i}", "context": text, "question": question,
                         "answers": [answer], "template": template})
    if paragraphs_per_chunk > 1:
        for r in rows:
            p = int(r["id"].split("-")[2])
            first = p - p % paragraphs_per_chunk
            r["context"] = "\n\n".join(texts[first:first + paragraphs_per_chunk])
            r["id"] = f"invented-{seed}-c{paragraphs_per_chunk}-{p}-{r['id'].rsplit('-', 1)[1]}"
    return rows


def write_invented_qa(path: str | Path, n_paragraphs: int = 50, *, seed: int = 0,
                      questions_per_paragraph: int = 3, paragraphs_per_chunk: int = 1) -> Path:
    """Write :func:`invented_qa` rows to a JSONL file and return its path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = invented_qa(n_paragraphs, seed=seed, questions_per_paragraph=questions_per_paragraph,
                       paragraphs_per_chunk=paragraphs_per_chunk)
    with out.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return out
