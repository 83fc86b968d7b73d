"""Synthetic fact paragraphs: invented entities with random attributes, and questions about them.

Why: in the Wikipedia and MetaICL questions most of the answer can be guessed without the context (a cloze
prompt holds the whole sentence around the blank; a wh-question names a topic the LM has priors about), so
an adapter that only teaches the answer *format* already gets most of the loss down, and the generator never
has to store anything. Here every name and value is drawn at random, so the answer is unguessable: the only
way to lower its loss is to carry it from the context into the adapter. Paragraphs of other invented entities
serve as distractors, so the generator must store several at once and the question must pick the right one.

Names mix made-up syllables with real surnames and English-looking place names, and later sentences often
refer back with a surname or "the town" instead of the full name: with made-up syllables alone the adapted LM
learnt to answer *any* who-question with a made-up name, whatever the document said.

The short value lists below let the generator cheat: it learnt to pick which list entry a paragraph named, not to
copy the value: a generator trained on the lists alone answered 30.4 F1 on 96 held-out paragraphs, 6.9 when every
list was swapped for values it had never seen, and it still answered from the old lists ("paper" for leather)
(docs/experiments/). `OpenValues`
draws names, towns and things from thousands of Wikipedia titles instead, split by a hash into values for training
and values kept for evaluation.
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r", "s", "st", "t", "v", "w", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou", "y")
_CODAS = ("", "", "n", "r", "l", "s", "th", "nd", "rk", "ck", "m", "st")
FIRST_NAMES = (
    "Anna Ben Clara David Elin Farid Greta Hugo Ines Jonas Kaito Lena Marta Nils Olga Pavel Quinn Rosa Samir Tove "
    "Umar Vera Wim Yara Zofia Amara Bruno Chen Dario Esme Felix Hana Ivo Jana Kofi Luca Mira Noor Otto Priya"
).split()
PROFESSIONS = (
    "baker carpenter nurse pilot chemist architect librarian fisherman teacher surgeon painter engineer "
    "translator gardener jeweller potter astronomer tailor violinist geologist"
).split()
SUBJECTS = "physics history music law medicine geology botany chemistry philosophy economics mathematics".split()
PRODUCTS = (
    "wool timber salt copper glassware cheese paper rope olive oil honey silk porcelain clocks bicycles tea".split()
)
COLOURS = "red green blue yellow purple orange white black grey brown".split()
ANIMALS = "fox owl horse otter heron wolf hare badger swan lynx".split()
INSTRUMENTS = "violin cello flute harp trumpet piano drums guitar oboe accordion".split()
SURNAMES = (
    "Abbott Barros Castell Dunmore Ekberg Faulk Garrow Haddon Ilves Jarvik Kessel Lorne Marsh Norell Pryce "
    "Rensing Salo Thorne Ulman Varga Weller Yates Zeller Blom Corrigan Delacroix Esposito Fairbanks Gunnarsson "
    "Halloran Jaspers Kowal Lindqvist Moreau Nakamura Okafor Petrov Ramos Sato Tanaka Underhill Valdez Whitlock"
).split()
_PLACE_HEADS = (
    "Ash Black Brook Cold Elm Fair Glen Green Hart High Kings Long Mill North Oak Red Salt Stone West Wolf"
).split()
_PLACE_TAILS = "ford bridge wick ham ton field mouth by stead worth haven dale cliff more holm".split()
LANDMARKS = "bridge|tower|lighthouse|church|library|museum|theatre|market hall|town hall|observatory".split("|")
INDUSTRIES = (
    "fishing|mining|tourism|shipbuilding|wine making|weaving|sheep farming|oyster farming|logging|brewing|"
    "printing|boat repair|cotton spinning|stone cutting"
).split("|")
FOODS = "lentil soup|roast duck|apple pie|grilled sardines|mushroom risotto|lamb stew|plum cake|fried rice".split("|")
VEHICLES = "ferry train bus tram boat coach".split()
MONTHS = "January February March April May June July August September October November December".split()
WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()


def invented_word(rng: random.Random, syllables: tuple[int, int] = (2, 3)) -> str:
    """A pronounceable made-up word (a surname, a town, a company) the LM has no prior about."""
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(*syllables))]
    return ("".join(parts) + rng.choice(_CODAS)).capitalize()


# words of the value templates ("the University of …", "… Street", "… Festival", "tulip farming"): never a value
_FIXED = set("the of University Street Festival Works Group and Sons Society Club Guild Company".split())
_FIXED |= set("farming making mining trade soup pie stew".split())
_LISTED = {  # every word of the lists: an answer holding only these can be picked, not copied
    word
    for values in (FIRST_NAMES, SURNAMES, PROFESSIONS, SUBJECTS, PRODUCTS, COLOURS, ANIMALS, INSTRUMENTS, LANDMARKS)
    + (INDUSTRIES, FOODS, VEHICLES, MONTHS, WEEKDAYS)
    for value in values
    for word in value.split()
}
_HELDOUT_BUCKET = 5  # one value in 5 (by a hash of its text) is kept for evaluation


@dataclass(frozen=True)
class OpenValues:
    """Fact values from Wikipedia titles: first names and surnames from two- and three-word titles ("Frank Gehry"),
    proper nouns from one-word titles whose lead never writes them in lower case ("Nagpur": towns, surnames), and
    common nouns from those it does ("cider": products, trades, dishes, festivals). `probability` is the chance that
    a slot takes an open value instead of a list entry; `heldout` chooses the half of each pool."""

    first_names: tuple[str, ...]
    proper_nouns: tuple[str, ...]
    things: tuple[str, ...]
    probability: float = 1.0

    @classmethod
    def from_leads(cls, leads: Iterable[tuple[str, str]], heldout: bool, probability: float = 1.0) -> OpenValues:
        if not 0 < probability <= 1:
            raise ValueError("probability must be in (0, 1]")
        first, proper, things = set(), set(), set()
        for title, text in leads:
            words = title.split()
            if not all(re.fullmatch(r"[A-Za-z]{3,14}", w) for w in words):
                continue
            if len(words) == 1 and re.search(rf"\b{title.lower()}\b", text):
                things.add(title.lower())
            elif len(words) == 1:
                proper.add(title)
            elif len(words) <= 3 and all(w[0].isupper() for w in words):
                first.add(words[0])
                proper.add(words[-1])

        def half(pool: set[str]) -> tuple[str, ...]:
            pool = pool - _FIXED
            kept = tuple(sorted(v for v in pool if (zlib.crc32(v.encode()) % _HELDOUT_BUCKET == 0) == heldout))
            if not kept:
                raise ValueError("the leads gave no values for one of the pools")
            return kept

        return cls(half(first), half(proper), half(things), probability)

    def holds_value(self, text: str) -> bool:
        """Whether `text` holds one of these values: the held-out questions whose answer must be copied."""
        pools = (self.first_names, self.proper_nouns, self.things)
        words = set(re.findall(r"[A-Za-z]+", text)) - _LISTED
        return any(word in pool for word in words for pool in pools)


class FactRandom(random.Random):
    """A seeded random source that also carries the open values a fact draw may use. With `values=None` it draws
    exactly what `random.Random(seed)` does (the lists only), so earlier runs stay reproducible."""

    def __init__(self, seed: int, values: OpenValues | None = None):
        super().__init__(seed)
        self.values = values


def _open(rng: random.Random, pool: str) -> str | None:
    """A value from the open pool `pool`, or None (use the list) — always None for a plain random.Random."""
    values = getattr(rng, "values", None)
    if values is None or rng.random() >= values.probability:
        return None
    return rng.choice(getattr(values, pool))


def surname(rng: random.Random) -> str:
    return _open(rng, "proper_nouns") or (invented_word(rng) if rng.random() < 0.5 else rng.choice(SURNAMES))


def person(rng: random.Random) -> str:
    return f"{_open(rng, 'first_names') or rng.choice(FIRST_NAMES)} {surname(rng)}"


def place(rng: random.Random) -> str:
    """A made-up town: invented syllables or an English-looking compound ("Saltwick", "Oakhaven")."""
    return _open(rng, "proper_nouns") or (
        invented_word(rng) if rng.random() < 0.5 else rng.choice(_PLACE_HEADS) + rng.choice(_PLACE_TAILS)
    )


def common_noun(rng: random.Random, listed: tuple[str, ...] | list[str], suffixes: tuple[str, ...] = ("",)) -> str:
    """A common noun: an open one with a suffix ("tulip farming", "cider stew"), or an entry of `listed`."""
    value = _open(rng, "things")
    return (value + " " + rng.choice(suffixes)).strip() if value else rng.choice(listed)


# One fact = (sentence, question, answer); a kind of entity = a name maker + fact makers taking (rng, name).
Fact = tuple[str, str, str]
FactMaker = Callable[[random.Random, str], Fact]


def _person_facts() -> list[FactMaker]:
    def born(rng, n):
        year, town = str(rng.randint(1850, 2005)), place(rng)
        return rng.choice(
            (
                (f"{n} was born in {town} in {year}.", f"Where was {n} born?", town),
                (f"{n} was born in {year} in the town of {town}.", f"In which year was {n} born?", year),
            )
        )

    def job(rng, n):
        work, firm = rng.choice(PROFESSIONS), f"{surname(rng)} {rng.choice(('Works', 'Group', 'and Sons'))}"
        return rng.choice(
            (
                (f"{n} works as a {work} for {firm}.", f"What is {n}'s job?", work),
                (f"{n} is a {work} employed by {firm}.", f"Which company does {n} work for?", firm),
            )
        )

    def study(rng, n):
        subject, uni = rng.choice(SUBJECTS), f"the University of {place(rng)}"
        return rng.choice(
            (
                (f"{n} studied {subject} at {uni}.", f"What did {n} study?", subject),
                (f"At {uni}, {n} earned a degree in {subject}.", f"Where did {n} study?", uni),
            )
        )

    def family(rng, n):
        other = person(rng)
        return rng.choice(
            (
                (f"{n} is married to {other}.", f"Who is {n} married to?", other),
                (f"{n}'s closest friend is {other}.", f"Who is {n}'s closest friend?", other),
            )
        )

    def hobby(rng, n):
        instrument, animal = rng.choice(INSTRUMENTS), rng.choice(ANIMALS)
        return rng.choice(
            (
                (f"In the evenings {n} plays the {instrument}.", f"Which instrument does {n} play?", instrument),
                (f"{n} keeps a pet {animal} called {invented_word(rng)}.", f"What kind of pet does {n} keep?", animal),
            )
        )

    def home(rng, n):
        street, town, food = f"{surname(rng)} Street", place(rng), common_noun(rng, FOODS, ("soup", "pie", "stew"))
        return rng.choice(
            (
                (f"{n} lives on {street} in {town}.", f"On which street does {n} live?", street),
                (f"{n}'s favourite dish is {food}.", f"What is {n}'s favourite dish?", food),
            )
        )

    return [born, job, study, family, hobby, home]


def _place_facts() -> list[FactMaker]:
    def founded(rng, n):
        year, founder = str(rng.randint(1100, 1950)), person(rng)
        return rng.choice(
            (
                (f"{n} was founded in {year} by {founder}.", f"When was {n} founded?", year),
                (f"{founder} founded {n} in {year}.", f"Who founded {n}?", founder),
            )
        )

    def located(rng, n):
        region, river = invented_word(rng), invented_word(rng)
        return rng.choice(
            (
                (f"{n} lies in the province of {region}.", f"In which province is {n}?", region),
                (f"{n} stands on the banks of the river {river}.", f"Which river flows through {n}?", river),
            )
        )

    def economy(rng, n):
        product = common_noun(rng, PRODUCTS)
        return (f"{n} is best known for making {product}.", f"What is {n} known for making?", product)

    def people(rng, n):
        leader, population = person(rng), f"{rng.randint(2, 95)},{rng.randint(100, 999)}"
        return rng.choice(
            (
                (f"The leader of the {n} council is {leader}.", f"Who leads the council of {n}?", leader),
                (f"The mayor of {n} is {leader}.", f"Who is the mayor of {n}?", leader),
                (f"{n} has a population of {population}.", f"How many people live in {n}?", population),
            )
        )

    def landmark(rng, n):
        thing, builder, year = rng.choice(LANDMARKS), person(rng), str(rng.randint(1300, 1990))
        return rng.choice(
            (
                (f"The {thing} of {n} was built by {builder} in {year}.", f"Who built the {thing} of {n}?", builder),
                (f"In {year} {builder} designed the {thing} of {n}.", f"Who designed the {thing} of {n}?", builder),
                (f"The {thing} of {n} opened in {year}.", f"When did the {thing} of {n} open?", year),
            )
        )

    def industry(rng, n):
        trade = common_noun(rng, INDUSTRIES, ("farming", "making", "mining", "trade"))
        festival = f"{(_open(rng, 'things') or invented_word(rng)).capitalize()} Festival"
        month = rng.choice(MONTHS)
        return rng.choice(
            (
                (f"The main industry of {n} is {trade}.", f"What is the main industry of {n}?", trade),
                (f"Most people in {n} work in {trade}.", f"In which industry do most people in {n} work?", trade),
                (f"Every {month}, {n} holds the {festival}.", f"What festival does {n} hold every {month}?", festival),
            )
        )

    def travel(rng, n):
        vehicle, other, unit = rng.choice(VEHICLES), place(rng), rng.choice(("hours", "minutes"))
        duration = f"{rng.randint(2, 9 if unit == 'hours' else 55)} {unit}"
        return (
            f"A {vehicle} connects {n} to {other}; the journey takes {duration}.",
            f"How long does the {vehicle} from {n} to {other} take?",
            duration,
        )

    def custom(rng, n):
        month, colour = rng.choice(MONTHS), rng.choice(COLOURS)
        return rng.choice(
            (
                (f"Every {month}, {n} celebrates its harvest fair.", f"In which month is the fair of {n}?", month),
                (f"The houses of {n} are painted {colour}.", f"What colour are the houses of {n}?", colour),
            )
        )

    return [founded, located, economy, people, custom, landmark, industry, travel]


def _organisation_facts() -> list[FactMaker]:
    def leader(rng, n):
        boss, year = person(rng), str(rng.randint(1900, 2024))
        return rng.choice(
            (
                (f"{n} is run by {boss}.", f"Who runs {n}?", boss),
                (f"{n} was set up in {year}.", f"When was {n} set up?", year),
            )
        )

    def base(rng, n):
        city, day = place(rng), rng.choice(WEEKDAYS)
        return rng.choice(
            (
                (f"The headquarters of {n} are in {city}.", f"Where are the headquarters of {n}?", city),
                (f"The members of {n} meet every {day}.", f"On which day do the members of {n} meet?", day),
            )
        )

    def symbol(rng, n):
        animal, colour = rng.choice(ANIMALS), rng.choice(COLOURS)
        return rng.choice(
            (
                (f"The emblem of {n} is a {animal}.", f"What animal is on the emblem of {n}?", animal),
                (f"The flag of {n} is {colour}.", f"What colour is the flag of {n}?", colour),
            )
        )

    def size(rng, n):
        members = str(rng.randint(12, 900))
        return (f"{n} has {members} members.", f"How many members does {n} have?", members)

    def trade(rng, n):
        product, partner = common_noun(rng, PRODUCTS), person(rng)
        return rng.choice(
            (
                (f"{n} sells {product} to the mainland.", f"What does {n} sell?", product),
                (f"The treasurer of {n} is {partner}.", f"Who is the treasurer of {n}?", partner),
            )
        )

    return [leader, base, symbol, size, trade]


# (name maker, fact makers, sentences introducing the entity, how later sentences may refer back to it)
_KINDS: tuple[tuple[Callable[[random.Random], str], list[FactMaker], tuple[str, ...], Callable[[str], tuple]], ...] = (
    (
        person,
        _person_facts(),
        ("{N} is a person from the island of {w}.", "{N} grew up on the island of {w}."),
        lambda name: (name.split()[-1],),
    ),
    (
        place,
        _place_facts(),
        ("{N} is a town on the island of {w}.", "{N} is a small town in the north of {w}."),
        lambda name: ("It", "The town"),
    ),
    (
        lambda rng: f"the {invented_word(rng)} {rng.choice(('Society', 'Club', 'Guild', 'Company'))}",
        _organisation_facts(),
        ("{N} is an organisation on the island of {w}.", "{N} was formed by people of {w}."),
        lambda name: ("It", f"The {name.split()[-1].lower()}"),
    ),
)


def _capitalised(text: str) -> str:
    return text[0].upper() + text[1:]


def fact_paragraph(rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    """One invented entity: a paragraph of 3–5 facts and the (question, answer) pair of each. After the
    first sentence, a fact about the entity names it in full or, as real text does, refers back to it."""
    make_name, makers, intros, references = rng.choice(_KINDS)
    name = make_name(rng)
    facts = [maker(rng, name) for maker in rng.sample(makers, min(len(makers), rng.randint(3, 5)))]
    sentences = [rng.choice(intros).format(N=_capitalised(name), w=place(rng))]
    for sentence, _, _ in facts:
        if sentence.startswith(name) and rng.random() < 0.4:
            sentence = rng.choice(references(name)) + sentence[len(name) :]
        sentences.append(_capitalised(sentence))
    return " ".join(sentences), [(q, a) for _, q, a in facts]


def fact_questions(rng: random.Random, count: int, max_distractors: int = 2) -> list[tuple[list[str], str, str]]:
    """`count` (context, question, answer) triples about invented entities; each entity's paragraph is shuffled
    among 0–`max_distractors` paragraphs about other invented entities, and two of its facts are asked."""
    out = []
    while len(out) < count:
        paragraph, questions = fact_paragraph(rng)
        context = [paragraph] + [fact_paragraph(rng)[0] for _ in range(rng.randint(0, max_distractors))]
        rng.shuffle(context)
        out += [(list(context), q, a) for q, a in rng.sample(questions, min(2, len(questions)))]
    return out[:count]


_WORD = re.compile(r"\b[A-Z][\w'’-]*")
_DIGITS = re.compile(r"\b\d[\d,]*\b")
_SENTENCE_END = re.compile(r"(?:^|[.!?:;\n][\"'’”)]*)\s*$")
# Capitalised words that are not names of things a lead is about: kept, so the text stays grammatical.
_COMMON = set(MONTHS) | set(WEEKDAYS) | {"I", "A", "AD", "BC", "CE", "BCE", "St", "Mr", "Mrs", "Dr", "Sir"}
_DEMONYM = re.compile(r"(?:ian|ish|ese|can|ic)$")  # "Italian", "English", "Japanese", "American", "Arabic"


def _fresh_name(rng: random.Random, taken: set[str]) -> str:
    while (name := surname(rng) if rng.random() < 0.5 else place(rng)) in taken:
        pass
    taken.add(name)
    return name


def counterfactual_lead(title: str, text: str, rng: random.Random) -> tuple[str, str]:
    """A Wikipedia lead with every name and number consistently replaced: "Ada Lovelace ... born in 1815 in
    London" -> "Northford Redfield ... born in 1748 in Delacroix" (with random.Random(0)). Why: on real leads
    the LM already knows most answers, so the adapter need not store them; the fact paragraphs force storage
    but in a few fixed sentence shapes. Swapped leads keep real prose while making every name and number
    unguessable without the context.

    A name is a capitalised word in the title or anywhere but a sentence start (so "The", "In" stay); months,
    weekdays and demonyms stay. Years move by one offset (their order survives), other numbers get new digits."""
    words = {m.group() for m in _WORD.finditer(title)}
    words |= {m.group() for m in _WORD.finditer(text) if not _SENTENCE_END.search(text[: m.start()])}
    names = sorted(w for w in words if w not in _COMMON and not _DEMONYM.search(w))
    taken: set[str] = set()
    mapping = {w: _fresh_name(rng, taken) for w in names}
    offset = rng.choice([-1, 1]) * rng.randint(3, 80)

    def number(match: re.Match) -> str:
        digits = match.group()
        if digits not in mapping:
            value = digits.replace(",", "")
            if len(value) == 4 and 1000 <= int(value) <= 2099:
                mapping[digits] = str(int(value) + offset)
            else:
                new = "".join(c if c == "," else str(rng.randint(0 if i else 1, 9)) for i, c in enumerate(digits))
                mapping[digits] = new if len(value) > 1 else str(rng.randint(2, 9))
        return mapping[digits]

    def swap(s: str) -> str:
        return _DIGITS.sub(number, _WORD.sub(lambda m: mapping.get(m.group(), m.group()), s))

    return swap(title), swap(text)
