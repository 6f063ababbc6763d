"""Seeded fictional encyclopedia articles in WikiText format.

A pretrained LM has read Wikipedia, so WikiText facts may already be in its weights. These
articles are about invented people, places, organisations and battles, with invented names
(built from syllables), dates and numbers, so every fact in them is new to any model.

The text follows the WikiText raw layout of one `EleutherAI/wikitext_document_level` page:
lines joined by "\\n", each line starting with a space, ` = Title = `, ` = = Section = = `,
blank lines ` `, and punctuation split off by spaces (`1 @,@ 200`, `born in 1820 .`).

Only `random.Random(seed)` is used, and nothing iterates over a set, so the output depends on
the seed alone (not on PYTHONHASHSEED or the process). Article i of a run does not depend on
how many articles are asked for: `generate_articles(5, s)[:3] == generate_articles(3, s)`.
"""
from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

MAX_SECTIONS = 6  # every topic below has this many section kinds
MIN_WORDS = 150  # an article's length in whitespace-separated tokens, headings and punctuation included
MAX_WORDS = 400
_TARGET_WORDS = (170, 370)  # drawn per article; the margin keeps the result inside MIN_WORDS..MAX_WORDS
_MAX_TITLE_TRIES = 1000

# --- invented names -------------------------------------------------------------------------

_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "kl", "l", "m", "n", "p",
           "r", "s", "st", "t", "th", "tr", "v", "w", "z")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "nd", "rn", "sk", "th")


def _word(rng: random.Random, min_syllables: int = 2, max_syllables: int = 3) -> str:
    """An invented capitalised word such as 'Draveskan'."""
    n = rng.randint(min_syllables, max_syllables)
    syllables = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n))
    return (syllables + rng.choice(_CODAS)).capitalize()


def _person(rng: random.Random) -> str:
    return f"{_word(rng, 2, 2)} {_word(rng)}"


_ORG_FORMS = (
    ("{w} Society of Cartographers", "the society", "learned society"),
    ("{w} Natural History Society", "the society", "learned society"),
    ("{w} Trading Company", "the company", "trading company"),
    ("{w} Ironworks Company", "the company", "manufacturing company"),
    ("Royal {w} Academy", "the academy", "academy"),
    ("{w} Choral Guild", "the guild", "musical guild"),
    ("{w} Guild of Weavers", "the guild", "craft guild"),
)


def _org(rng: random.Random) -> str:
    return rng.choice(_ORG_FORMS)[0].format(w=_word(rng))


_WORK_FORMS = ("The {w} Hours", "Songs of {w}", "A Survey of {w}", "The Book of {w}",
               "Letters from {w}", "The {w} Cycle", "On the Rivers of {w}")


def _work(rng: random.Random) -> str:
    return rng.choice(_WORK_FORMS).format(w=_word(rng))


def _a(noun: str) -> str:
    """The noun with its indefinite article."""
    return ("an " if noun[0] in "aeiou" else "a ") + noun


_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_ADJECTIVES = ("plain", "careful", "restless", "sober", "vivid", "gentle", "severe", "quiet",
               "bold", "measured", "lively", "formal")
_TRADES = ("baker", "miller", "carpenter", "glassmaker", "ferryman", "schoolteacher", "merchant",
           "clockmaker", "tanner", "printer")
_JOBS = (("painter", "painting"), ("cartographer", "cartography"), ("composer", "music"),
         ("botanist", "botany"), ("engineer", "engineering"), ("poet", "poetry"),
         ("astronomer", "astronomy"), ("physician", "medicine"), ("architect", "architecture"),
         ("historian", "history"))
_HOBBIES = ("gardener", "chess player", "sailor", "collector of coins", "walker", "beekeeper")
_INDUSTRIES = ("salt mining", "wool weaving", "river trade", "brewing", "timber", "pottery",
               "fishing", "paper making")
_FOODS = ("smoked eel with barley", "plum dumplings", "river trout baked in clay",
          "honey bread", "lentil soup with sorrel", "goat cheese pastries")
_OUTCOMES = ("a decisive victory", "a narrow victory", "a costly defeat", "a heavy defeat")
_SETTLEMENTS = ("town", "village", "city", "market town", "port town")


def _year_in(lo: int, hi: int) -> Callable[[random.Random], str]:
    return lambda rng: str(rng.randint(lo, max(lo, hi)))


# Fresh values drawn the first time a sentence uses the key; `person2` draws like `person`.
_FRESH: Mapping[str, Callable[[random.Random], str]] = MappingProxyType({
    "person": _person,
    "given": lambda rng: _word(rng, 2, 2),
    "place": lambda rng: _word(rng),
    "word": lambda rng: _word(rng),
    "org": _org,
    "work": _work,
    "num": lambda rng: str(rng.randint(2, 40)),
    "small": lambda rng: str(rng.randint(2, 9)),
    "dist": lambda rng: str(rng.randint(10, 300)),
    "pct": lambda rng: str(rng.randint(5, 60)),
    "big": lambda rng: f"{rng.randint(1_200, 98_000):,}",
    "height": lambda rng: f"{rng.randint(300, 2_900):,}",
    "day": lambda rng: str(rng.randint(1, 28)),
    "month": lambda rng: rng.choice(_MONTHS),
    "weekday": lambda rng: rng.choice(_WEEKDAYS),
    "adj": lambda rng: rng.choice(_ADJECTIVES),
    "trade": lambda rng: rng.choice(_TRADES),
    "hobby": lambda rng: rng.choice(_HOBBIES),
    "industry": lambda rng: rng.choice(_INDUSTRIES),
    "food": lambda rng: rng.choice(_FOODS),
})


class _Filler:
    """Mapping for str.format_map: the article's fixed facts, plus fresh values drawn on first use."""

    def __init__(self, rng: random.Random, facts: dict[str, str], years: Callable[[random.Random], str]) -> None:
        self._rng = rng
        self._values = dict(facts)  # a copy: fresh values live for one sentence only
        self._years = years

    def __getitem__(self, key: str) -> str:
        if key not in self._values:
            base = key.rstrip("0123456789")
            if base == "year":
                self._values[key] = self._years(self._rng)
            elif base == "until":  # a year no earlier than this sentence's {year}
                self._values[key] = str(int(self["year"]) + self._rng.randint(1, 30))
            elif base == "later":  # a year after the subject's end (death, battle), not after 2020
                end = int(self["end"])
                self._values[key] = str(self._rng.randint(min(end + 3, 2020), min(end + 150, 2020)))
            elif base in _FRESH:
                self._values[key] = _FRESH[base](self._rng)
            else:
                raise KeyError(f"synthetic template uses unknown field {key!r}")
        return self._values[key]


# --- topics: the templates of one kind of article -------------------------------------------

@dataclass(frozen=True)
class _Topic:
    lead: tuple[str, ...]  # the first sentence defines the subject and always comes first
    sections: tuple[tuple[str, tuple[str, ...]], ...]  # (heading, sentences), in reading order


_PERSON = _Topic(
    lead=(
        "{name} ({start} – {end}) was {a_job} from {country}, best remembered for {poss} work in the province of {region}.",
        "Born in {home}, {short} spent most of {poss} life within {dist} kilometres of the {river} River.",
        "{Pron} is regarded as one of the most original figures in the {field} of {poss} generation.",
        "{Poss} reputation rests largely on {num} works written between {year} and {until}.",
    ),
    sections=(
        ("Early life", (
            "{short} was born on {day} {month} {start} in {home}, the {child} of a {trade} named {person}.",
            "{Poss} family moved to {place} when {pron} was {small} years old.",
            "As a child {pron} was taught by {person}, a local {trade} with an interest in {field}.",
            "{Pron} was educated at the {org} in {place}, where {pron} studied for {small} years.",
            "In {year} {pron} left {home} for {place}, a journey of about {dist} kilometres.",
        )),
        ("Career", (
            "In {year} {short} received {poss} first commission from the {org}.",
            "Between {year} and {until} {pron} worked in {place}, where {pron} took {num} pupils.",
            "{Poss} appointment as chief {job} of {region} in {year} made {short} well known throughout {country}.",
            "{Pron} collaborated with {person} on a survey of the {place} valley, which took {small} years to complete.",
            "By {year} {short} employed {num} assistants and kept a workshop on the {adj} side of {place}.",
        )),
        ("Major works", (
            "{Poss} best known work, {work}, was completed in {year} and first shown in {place}.",
            "{work} ({year}) runs to {big} pages and describes the customs of {region} in detail.",
            "Critics in {place} praised {work} for its {adj} style, although {person} called it unfinished.",
            "{Pron} also wrote {work}, a shorter piece dedicated to {person}.",
            "Only {small} copies of {work} are known to survive, one of them in the library of the {org}.",
        )),
        ("Personal life", (
            "In {year} {short} married {person}, a {trade} from {place}; they had {small} children.",
            "{Pron} was a keen {hobby} and kept a house near {place} for the summer months.",
            "{short} corresponded for many years with {person}, and {big} of their letters survive.",
            "{Pron} suffered from poor health after a fall in {year}, which ended {poss} travels abroad.",
        )),
        ("Later years", (
            "{short} retired to {home} in {year} and spent {poss} last years revising {work}.",
            "{Pron} died in {place} on {day} {month} {end}, at the age of {age}.",
            "{Poss} funeral was attended by about {small}00 people, among them members of the {org}.",
            "In {year} the {org} elected {short} as its honorary president.",
        )),
        ("Legacy", (
            "A street in {place} was named after {short} in {later}.",
            "The {org} holds a collection of {num} of {poss} works.",
            "Historians such as {person} have described {short} as the founder of modern {field} in {country}.",
            "A statue of {short} by {person} has stood in the main square of {home} since {later}.",
            "In {later} a prize in {poss} name was established, awarded every {small} years.",
        )),
    ),
)

_SETTLEMENT = _Topic(
    lead=(
        "{name} is {a_kind} in the province of {region}, {country}, with a population of {big} at the {census} census.",
        "It lies on the {bank} bank of the {river} River, about {dist} kilometres from {place}.",
        "The {kind} is known for its {adj} stone houses and for its {industry}.",
    ),
    sections=(
        ("History", (
            "{short} was first recorded in {start} as a small settlement owned by the {org}.",
            "In {year} the {kind} was granted a market charter by {person}.",
            "A fire in {year} destroyed {num} houses and the old wooden church.",
            "During the war of {year} {short} was occupied for {small} months by troops from {place}.",
            "The walls were demolished in {year}, and the stone was used to build the bridge over the {river}.",
        )),
        ("Geography", (
            "{short} stands at an elevation of {dist} metres above sea level.",
            "It is surrounded by {adj} hills, the highest of which, Mount {word}, rises to {height} metres.",
            "The {river} divides {short} into an older northern district and the newer district of {place}.",
            "The climate is mild, with an average of {num} days of frost each year.",
            "The nearest larger towns are {place} to the north and {place2} to the east.",
        )),
        ("Economy", (
            "The economy of {short} has long depended on {industry}.",
            "In {year} the {org} opened a factory in the {kind}, which employed {big} workers at its peak.",
            "Around {pct} percent of the working population is employed in {industry}.",
            "A weekly market has been held in the main square every {weekday} since {year}.",
            "The largest employer today is the {org}, with about {small}00 staff.",
        )),
        ("Culture", (
            "The annual {word} Festival, held each {month}, attracts about {big} visitors.",
            "The museum, founded in {year} by {person}, holds {big} objects relating to the history of {region}.",
            "{short} is known for a local dish of {food}.",
            "The church of Saint {given} dates from {year} and contains a painted ceiling by {person}.",
            "The {org} has given a concert in {short} every {month} since {year}.",
        )),
        ("Transport", (
            "{short} railway station opened in {railway} on the line from {place} to {place2}.",
            "A bridge over the {river} was completed in {year}, replacing a ferry that had operated for {num} years.",
            "Buses run every {num} minutes to {place}, a journey of about {dist} kilometres.",
            "The old road to {place} was paved in {year} and widened in {until}.",
        )),
        ("Notable people", (
            "The {job} {person}, born in {year}, grew up in {short} and later moved to {place}.",
            "The {trade} and writer {person} lived in the {kind} from {year} until {until}.",
            "{person}, who founded the {org}, spent {small} years in {short}.",
            "The {job} {person} is buried in the churchyard of Saint {given}.",
        )),
    ),
)

_ORGANISATION = _Topic(
    lead=(
        "The {name} is {a_kind} founded in {home} in {start} by {founder}.",
        "It has its headquarters in {home}, in the province of {region}, {country}.",
        "{Short} had {num}0 members in {year} and is still active in {field} today.",
    ),
    sections=(
        ("History", (
            "{Short} was founded in {start} by {founder} and {num} associates, who met in a room above a bakery in {home}.",
            "In {year} it received a royal charter from the government of {country}.",
            "A dispute in {year} over the election of {person} led {num} members to leave and form the {org}.",
            "{Short} moved to larger premises on {word} Street in {year}.",
            "During the depression of {year} {short} nearly closed, and was saved by a loan of {big} crowns from {person}.",
        )),
        ("Organisation", (
            "{Short} is governed by a council of {num} members, elected every {small} years.",
            "Its president since {year} has been {person}.",
            "{Short} has {num} regional branches, the largest of which is in {place}.",
            "The annual budget in {year} was {big} crowns, most of it raised from subscriptions.",
        )),
        ("Activities", (
            "Since {year} {short} has awarded the {word} Medal for outstanding contributions to {field}.",
            "In {year} it paid for the construction of an observatory near {place}.",
            "It keeps a library of {big} volumes, open to the public on {weekday} afternoons.",
            "Every {small} years {short} sends an expedition to the {adj} uplands of {region}.",
        )),
        ("Membership", (
            "Membership grew from {small} in {start} to {num}0 by {year}.",
            "Women were admitted as full members from {year}.",
            "Notable members have included {person}, {person2} and {person3}.",
            "New members must be proposed by at least {small} existing members.",
        )),
        ("Publications", (
            "{Short} has published the journal {work} since {year}.",
            "Its most successful publication, {work}, sold {big} copies in its first year.",
            "In {year} {short} issued an atlas of {region} in {num} volumes.",
            "The proceedings of its meetings have appeared each {month} since {year}.",
        )),
        ("Reception", (
            "The historian {person} described {short} as the most important {kind} in {country}.",
            "{Short} was criticised in {year} for refusing to admit members from {place}.",
            "A history of {short}, written by {person}, was published in {year}.",
            "By {year} its annual meeting in {home} was attended by about {small}00 visitors.",
        )),
    ),
)

_BATTLE = _Topic(
    lead=(
        "The {name} was fought on {date} near {home} in {region}, between the army of {country} and forces raised by {leader}.",
        "It ended in {outcome} for {country}, and is remembered as one of the bloodiest engagements of the {war} War.",
        "About {troops} soldiers took part in the fighting, which lasted less than {small} days.",
    ),
    sections=(
        ("Background", (
            "Tension between {country} and {place} had grown since {before}, when {person} seized control of the {river} crossings.",
            "In {month} {start} {leader} assembled an army of {num} regiments at {place}.",
            "The commander of the garrison at {home}, {person}, had only {num} cannon and {small}00 soldiers.",
            "Negotiations held at {place} in {before} had failed after {num} days.",
        )),
        ("Opposing forces", (
            "The army of {country} consisted of {num} infantry regiments and {small} squadrons of cavalry.",
            "{leader} commanded the larger part of these troops, many of them recruited in {place}.",
            "Both sides relied on supplies carried along the {river} River from {place}.",
            "The artillery of {country} was led by {person}, who had served at the siege of {place} in {before}.",
        )),
        ("Battle", (
            "Fighting began at dawn when {num} companies crossed the {river} near {place}.",
            "By midday the right flank, led by {person}, had been pushed back to the village of {place}.",
            "A counterattack in the afternoon captured {num} guns and the hill known as {word} Height.",
            "Heavy rain in the evening ended the fighting after about {small} hours.",
        )),
        ("Aftermath", (
            "Casualties were estimated at {casualties} killed and wounded.",
            "{leader} withdrew to {place} and signed a truce on {day} {month} {start}.",
            "The peace agreed at {place} in {after} gave the district of {place2} to {country}.",
            "{person} was promoted to general in {after} for {poss} part in the battle.",
        )),
        ("Legacy", (
            "The {name} is the subject of the poem {work} by {person}.",
            "Excavations in {later} recovered {big} musket balls and {num} buttons from the battlefield.",
            "The historian {person} argued in {later} that the battle decided the {war} War.",
            "A regimental march, {work}, was written in memory of the battle.",
        )),
        ("Commemoration", (
            "A memorial to the fallen was unveiled at {home} in {later}.",
            "Each year on the anniversary of the battle a ceremony is held at the site.",
            "A museum opened on the battlefield in {later}, and receives about {big} visitors a year.",
            "The {org} has organised a re-enactment of the battle every {small} years since {later}.",
        )),
    ),
)

_TOPICS = (_PERSON, _SETTLEMENT, _ORGANISATION, _BATTLE)


# --- the facts of one article -----------------------------------------------------------------

def _person_facts(rng: random.Random) -> tuple[str, dict[str, str], Callable[[random.Random], str]]:
    given, family = _word(rng, 2, 2), _word(rng)
    start = rng.randint(1500, 1880)
    end = start + rng.randint(38, 89)
    job, field = rng.choice(_JOBS)
    he = rng.random() < 0.5
    facts = {
        "name": f"{given} {family}", "short": family, "start": str(start), "end": str(end),
        "age": str(end - start), "job": job, "a_job": _a(job), "field": field,
        "pron": "he" if he else "she", "Pron": "He" if he else "She",
        "poss": "his" if he else "her", "Poss": "His" if he else "Her",
        "child": "son" if he else "daughter",
    }
    return facts["name"], facts, _year_in(start + 16, end - 1)


def _settlement_facts(rng: random.Random) -> tuple[str, dict[str, str], Callable[[random.Random], str]]:
    name = _word(rng)
    start = rng.randint(900, 1500)
    kind = rng.choice(_SETTLEMENTS)
    job, _ = rng.choice(_JOBS)
    facts = {
        "name": name, "short": name, "start": str(start), "kind": kind, "a_kind": _a(kind),
        "census": str(rng.randint(1950, 2015)), "railway": str(rng.randint(1840, 1930)),
        "bank": rng.choice(("left", "right")), "job": job,
    }
    return name, facts, _year_in(start + 1, 1990)


def _organisation_facts(rng: random.Random) -> tuple[str, dict[str, str], Callable[[random.Random], str]]:
    form, short, kind = rng.choice(_ORG_FORMS)
    name = form.format(w=_word(rng))
    start = rng.randint(1600, 1950)
    facts = {
        "name": name, "short": short, "Short": short.capitalize(), "kind": kind, "a_kind": _a(kind),
        "start": str(start), "founder": _person(rng), "field": rng.choice(_JOBS)[1],
    }
    return name, facts, _year_in(start + 1, min(start + 150, 2015))


def _battle_facts(rng: random.Random) -> tuple[str, dict[str, str], Callable[[random.Random], str]]:
    place = _word(rng)
    start = rng.randint(1450, 1900)
    facts = {
        "name": f"Battle of {place}", "home": place, "start": str(start),
        "date": f"{rng.randint(1, 28)} {rng.choice(_MONTHS)} {start}",
        "leader": _person(rng), "war": _word(rng), "outcome": rng.choice(_OUTCOMES),
        "before": str(start - rng.randint(1, 12)), "after": str(start + rng.randint(1, 6)),
        "troops": f"{rng.randint(12_000, 60_000):,}", "casualties": f"{rng.randint(1_500, 9_000):,}",
        "end": str(start), "poss": "his",
    }
    return facts["name"], facts, _year_in(start + 1, start + 6)


_FACTS = (_person_facts, _settlement_facts, _organisation_facts, _battle_facts)


# --- WikiText layout --------------------------------------------------------------------------

def _wikitext(sentence: str) -> str:
    """Split punctuation off the way WikiText does: '1,200' -> '1 @,@ 200', 'end.' -> 'end .'."""
    s = re.sub(r"(\d),(\d)", r"\1 @,@ \2", sentence)
    s = re.sub(r"(\d)\.(\d)", r"\1 @.@ \2", s)
    s = re.sub(r"(\w)-(\w)", r"\1 @-@ \2", s)
    s = re.sub(r"(?<!@)([,.;:()])(?!@)", r" \1 ", s)
    s = re.sub(r"'s\b", " 's", s)
    return " ".join(s.split())


def _article(rng: random.Random, topic_index: int, title: str, facts: dict[str, str],
             years: Callable[[random.Random], str], num_sections: int) -> str:
    topic = _TOPICS[topic_index]
    target = rng.randint(*_TARGET_WORDS)
    chosen = sorted(rng.sample(range(len(topic.sections)), num_sections))  # keep reading order
    lines = [f" = {title} = ", " "]
    total = len(lines[0].split())

    def paragraphs(templates: tuple[str, ...], budget: int, first: str | None) -> list[str]:
        """Sentences until `budget` words, grouped into paragraph lines of 2-4 sentences."""
        nonlocal total
        # A random subset of the templates, told in their written order (which is roughly chronological).
        rest = [i for i in range(len(templates)) if templates[i] != first]
        order = ([templates.index(first)] if first else []) + rng.sample(rest, len(rest))
        picked: list[tuple[int, str]] = []
        used = 0
        while used < budget and order:
            index = order.pop(0)
            sentence = _wikitext(templates[index].format_map(_Filler(rng, facts, years)))
            n = len(sentence.split())
            if picked and total + n > MAX_WORDS:
                break
            picked.append((index, sentence))
            used += n
            total += n
        sentences = [sentence for _, sentence in sorted(picked)]
        out: list[str] = []
        while sentences:
            size = rng.randint(2, 4)
            out.append(" " + " ".join(sentences[:size]) + " ")
            sentences = sentences[size:]
        return out

    lines += paragraphs(topic.lead, target // 5, topic.lead[0])
    for k, section in enumerate(chosen):
        heading, templates = topic.sections[section]
        lines += [" ", f" = = {heading} = = ", " "]
        total += len(heading.split()) + 4
        budget = (target - total) // (num_sections - k)
        lines += paragraphs(templates, budget, None)
    lines.append(" ")
    return "\n".join(lines) + "\n"


def generate_articles(num_articles: int, seed: int, min_sections: int = 2, max_sections: int = 4) -> list[str]:
    """`num_articles` fictional articles with distinct titles, deterministic in `seed`.

    Each has a lead paragraph and min_sections..max_sections sections. With at least 2 sections an
    article is MIN_WORDS..MAX_WORDS whitespace-separated tokens long (headings and punctuation
    counted, as segment_article counts them); a single section gives about 100-190.
    """
    if num_articles < 0:
        raise ValueError(f"num_articles must be >= 0, got {num_articles}")
    if not 1 <= min_sections <= max_sections <= MAX_SECTIONS:
        raise ValueError(
            f"need 1 <= min_sections <= max_sections <= {MAX_SECTIONS}, got {min_sections} and {max_sections}"
        )
    rng = random.Random(seed)
    seen: set[str] = set()  # membership tests only: never iterated, so order cannot leak in
    articles: list[str] = []
    for _ in range(num_articles):
        topic_index = rng.randrange(len(_TOPICS))
        for _ in range(_MAX_TITLE_TRIES):
            title, facts, years = _FACTS[topic_index](rng)
            if title not in seen:
                break
        else:
            raise RuntimeError(f"no new title after {_MAX_TITLE_TRIES} tries")  # not reachable in practice
        seen.add(title)
        facts = {"country": _word(rng), "region": _word(rng), "river": _word(rng),
                 "home": _word(rng), **facts}  # topics may fix their own home
        facts.setdefault("short", title)
        facts.setdefault("Short", facts["short"][:1].upper() + facts["short"][1:])
        facts.setdefault("poss", "its")
        num_sections = rng.randint(min_sections, max_sections)
        articles.append(_article(rng, topic_index, title, facts, years, num_sections))
    return articles
