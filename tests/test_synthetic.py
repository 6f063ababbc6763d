"""synthetic.py: seeded fictional WikiText articles."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from docmem import synthetic

TITLE = re.compile(r" = (?!=)(.*\S) = ")
HEADING = re.compile(r" = = (?!=)(.*\S) = = ")


def test_deterministic_for_a_seed():
    assert synthetic.generate_articles(20, seed=3) == synthetic.generate_articles(20, seed=3)


def test_different_seeds_give_different_articles():
    a = synthetic.generate_articles(10, seed=0)
    b = synthetic.generate_articles(10, seed=1)
    assert all(x != y for x, y in zip(a, b))
    assert not {TITLE.fullmatch(x.split("\n")[0]).group(1) for x in a} & {
        TITLE.fullmatch(y.split("\n")[0]).group(1) for y in b}


def test_article_i_does_not_depend_on_how_many_are_asked_for():
    assert synthetic.generate_articles(7, seed=5)[:3] == synthetic.generate_articles(3, seed=5)


def test_zero_articles():
    assert synthetic.generate_articles(0, seed=0) == []


def _hash_in_subprocess(hash_seed: str) -> str:
    code = ("import hashlib, json; from docmem import synthetic; "
            "print(hashlib.sha256(json.dumps(synthetic.generate_articles(30, 11)).encode()).hexdigest())")
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True, timeout=60)
    return done.stdout.strip()


def test_independent_of_pythonhashseed():
    here = hashlib.sha256(json.dumps(synthetic.generate_articles(30, 11)).encode()).hexdigest()
    assert _hash_in_subprocess("0") == _hash_in_subprocess("98765") == here


def test_wikitext_layout():
    for article in synthetic.generate_articles(50, seed=2):
        lines = article.split("\n")
        assert TITLE.fullmatch(lines[0]), lines[0]
        assert lines[1] == " "  # a blank line after the title, as in WikiText
        assert lines[-1] == "" and lines[-2] == " "  # ends with a blank line and a newline
        for line in lines[:-1]:
            assert line.startswith(" "), line  # every WikiText raw line starts with a space
            assert line == " " or not line.endswith("  ")
        headings = [i for i, line in enumerate(lines) if HEADING.fullmatch(line)]
        assert 2 <= len(headings) <= 4
        for i in headings:  # blank line before and after each section heading
            assert lines[i - 1] == " " and lines[i + 1] == " "
            assert lines[i + 2].strip(), "a section has at least one paragraph"
        # only the title and the section headings contain '='
        assert [i for i, line in enumerate(lines) if "=" in line] == [0, *headings]


@pytest.mark.parametrize("sections", [1, 3, 6])
def test_section_count_follows_the_bounds(sections: int):
    for article in synthetic.generate_articles(20, seed=4, min_sections=sections, max_sections=sections):
        assert sum(bool(HEADING.fullmatch(line)) for line in article.split("\n")) == sections


def test_section_count_varies_within_the_bounds():
    counts = {sum(bool(HEADING.fullmatch(line)) for line in a.split("\n"))
              for a in synthetic.generate_articles(60, seed=8)}
    assert counts == {2, 3, 4}


def test_titles_are_distinct_within_a_run():
    titles = [TITLE.fullmatch(a.split("\n")[0]).group(1) for a in synthetic.generate_articles(500, seed=9)]
    assert len(set(titles)) == len(titles)


def test_word_counts():
    for seed in range(3):
        counts = [len(a.split()) for a in synthetic.generate_articles(200, seed=seed)]
        assert min(counts) >= synthetic.MIN_WORDS
        assert max(counts) <= synthetic.MAX_WORDS
        assert max(counts) - min(counts) > 100  # lengths vary
    for a in synthetic.generate_articles(100, seed=0, min_sections=6, max_sections=6):
        assert synthetic.MIN_WORDS <= len(a.split()) <= synthetic.MAX_WORDS


def test_text_is_filled_and_wikitext_tokenized():
    articles = synthetic.generate_articles(100, seed=6)
    text = "\n".join(articles)
    assert "{" not in text and "}" not in text  # every template field was filled
    assert not re.search(r"\d,\d", text) and "@,@" in text  # numbers as WikiText writes them: 1 @,@ 200
    assert not re.search(r"\w[.,;:]( |$)", text, re.M)  # punctuation split off: 'end .'
    for article in articles:
        body = [line for line in article.split("\n")[2:] if line.strip() and "=" not in line]
        assert all(line.rstrip().endswith(" .") for line in body)  # paragraphs are whole sentences


def test_variety():
    articles = synthetic.generate_articles(100, seed=10)
    headings = {m.group(1) for a in articles for line in a.split("\n") if (m := HEADING.fullmatch(line))}
    assert len(headings) >= 15  # several kinds of article, each with its own sections
    assert any(TITLE.fullmatch(a.split("\n")[0]).group(1).startswith("Battle of ") for a in articles)
    years = set(re.findall(r"\b1[0-9]{3}\b", "\n".join(articles)))
    assert len(years) > 200  # invented dates, not a handful of constants


@pytest.mark.parametrize("kwargs", [
    dict(num_articles=-1, seed=0),
    dict(num_articles=1, seed=0, min_sections=0),
    dict(num_articles=1, seed=0, min_sections=3, max_sections=2),
    dict(num_articles=1, seed=0, max_sections=synthetic.MAX_SECTIONS + 1),
])
def test_bad_arguments(kwargs: dict):
    with pytest.raises(ValueError):
        synthetic.generate_articles(**kwargs)
