import pytest
from datahelpers import paragraphs, sotu_texts

from mtnlg.data.clean import FilterConfig, QualityFilter, normalize
from mtnlg.errors import UserError


@pytest.fixture(scope="module")
def prose():
    return " ".join(paragraphs(sotu_texts(1), words=120)[:2])


def test_normalize_repairs_mojibake_and_whitespace():
    raw = "The cafÃ© is â€œopenâ€\x9d.\r\n\r\n\r\n\r\nNext\t\t  line  "
    assert normalize(raw) == 'The café is "open".\n\nNext line'
    assert normalize("e\u0301") == "\u00e9"  # NFC


def test_real_prose_passes(prose):
    assert QualityFilter().reason(prose) is None


@pytest.mark.parametrize("make, reason", [
    (lambda p: " ".join(p.split()[:20]), "min_words"),
    (lambda p: " ".join("a b c d" for _ in range(40)), "mean_word_length"),
    (lambda p: " ".join(w + (" #tag..." if i % 5 == 0 else "") for i, w in enumerate(p.split())),
     "symbol_word_ratio"),
    (lambda p: " ".join(w if i % 3 else "12345" for i, w in enumerate(p.split())), "alpha_fraction"),
    (lambda p: " ".join(["lorem ipsum dolor sit amet consectetur"] * 5 + ["quisque nibh"] * 30), "stopwords"),
    (lambda p: "\n".join(p.replace(".", "").replace(",", "").split()), "punctuation_lines"),
    (lambda p: "\n".join([p] + ["Subscribe to the newsletter of the day."] * 5), "duplicate_lines"),
    (lambda p: p + " the union" * 60, "top_2gram"),
    (lambda p: p + " " + " ".join(p.split()[:60]), "duplicate_5gram"),
])
def test_each_filter_names_what_it_removed(prose, make, reason):
    assert QualityFilter().reason(make(prose)) == reason


def test_filters_are_configurable(prose):
    short = " ".join(prose.split()[:20])
    config = FilterConfig()
    config.set("min_words=10")
    assert QualityFilter(config).reason(short) is None
    config.set("min-words=none")
    assert config.min_words is None
    assert QualityFilter(FilterConfig.disabled()).reason("x") is None
    with pytest.raises(UserError, match="NAME=VALUE"):
        config.set("no_such_filter=1")
    with pytest.raises(UserError, match="number"):
        config.set("min_words=many")
