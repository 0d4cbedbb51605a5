import numpy as np
from datahelpers import paragraphs, sotu_texts

from mtnlg.data.dedup import (
    SHINGLE,
    Deduplicator,
    MinHasher,
    MinHashParams,
    canonical,
    exact_hash,
)


def shingles(text: str) -> set[bytes]:
    data = canonical(text).encode("utf-8")
    return {data[i : i + SHINGLE] for i in range(len(data) - SHINGLE + 1)}


def true_jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def near_duplicate(text: str, rng: np.random.Generator, vocab: list[str]) -> str:
    """Edit about 2% of the words: substitutions, deletions, insertions, plus case/space noise."""
    words = text.split()
    out = []
    for word in words:
        roll = rng.random()
        if roll < 0.007:
            out.append(vocab[rng.integers(len(vocab))])
        elif roll < 0.014:
            continue
        elif roll < 0.021:
            out += [word, vocab[rng.integers(len(vocab))]]
        else:
            out.append(word)
    noisy = "  ".join(out)
    return noisy.upper() if rng.random() < 0.2 else noisy


def planted_corpus(seed: int = 0):
    """Distinct originals, planted near-copies, and hard negatives that share half their text."""
    rng = np.random.default_rng(seed)
    originals = paragraphs(sotu_texts(40), words=150)
    rng.shuffle(originals)
    originals = originals[:400]
    vocab = sorted({w for p in originals for w in p.split()})
    copies = [(int(i), near_duplicate(originals[i], rng, vocab)) for i in rng.choice(400, 200, replace=False)]
    negatives = []
    for a, b in rng.choice(400, (100, 2), replace=False).reshape(-1, 2):
        wa, wb = originals[a].split(), originals[b].split()
        negatives.append((int(a), " ".join(wa[:75] + wb[75:])))
    return originals, copies, negatives


def test_planted_near_duplicates_recall_and_precision():
    originals, copies, negatives = planted_corpus()
    # The construction is what it claims: copies are near-duplicates, negatives are not.
    assert min(true_jaccard(originals[i], c) for i, c in copies) >= 0.82
    assert max(true_jaccard(originals[i], n) for i, n in negatives) < 0.6
    docs = originals + [c for _, c in copies] + [n for _, n in negatives]
    planted = set(range(len(originals), len(originals) + len(copies)))
    hasher, dedup = MinHasher(MinHashParams()), Deduplicator("fuzzy")
    flagged = {k for k, doc in enumerate(docs) if dedup.check(exact_hash(doc), hasher.signature(doc))}
    recall = len(flagged & planted) / len(planted)
    precision = len(flagged & planted) / max(len(flagged), 1)
    print(f"planted={len(planted)} flagged={len(flagged)} recall={recall:.3f} precision={precision:.3f}")
    assert recall >= 0.95
    assert precision >= 0.99
    assert not flagged & set(range(len(originals)))  # no original is ever dropped (first seen wins)


def test_signature_estimates_jaccard():
    originals, copies, _ = planted_corpus(1)
    hasher = MinHasher(MinHashParams(bands=32, rows=8))
    errors = []
    for i, copy in copies[:30]:
        a, b = hasher.signature(originals[i]), hasher.signature(copy)
        errors.append((a == b).mean() - true_jaccard(originals[i], copy))
    assert abs(np.mean(errors)) < 0.03 and np.std(errors) < 0.06


def test_exact_mode_catches_only_normalized_identical_text():
    dedup = Deduplicator("exact")
    a = "The Union is strong.\nWe  shall endure."
    assert dedup.check(exact_hash(a), None) is None
    assert dedup.check(exact_hash("the union is STRONG. we shall endure."), None) == "exact"
    assert dedup.check(exact_hash("The Union is strong. We shall endure!"), None) is None


def test_signatures_are_deterministic_and_short_texts_work():
    params = MinHashParams()
    s1 = MinHasher(params).signature("a short text about the budget")
    s2 = MinHasher(params).signature("a short text about the budget")
    assert s1.dtype == np.uint32 and s1.shape == (params.num_perm,) and (s1 == s2).all()
    assert MinHasher(params).signature("ab").shape == (params.num_perm,)
