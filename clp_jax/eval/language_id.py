"""Which language a generated answer is in, to count answers in the wrong language as failures.

py3langid (a maintained fork of langid.py: a naive Bayes model over byte n-grams, 97 languages, shipped in
its 4.6 MB wheel) scores the answer; its probabilities are renormalized over the candidate languages (those a
study evaluates), so a French answer is not mistaken for Occitan. An answer is *wrong-language* when it has at
least MIN_LETTERS letters and its expected language gets less than MIN_EXPECTED of the probability; a bare
number ("12."), an empty answer or an ambiguous one ("No.") is never wrong-language.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Iterable, Sequence

from clp_jax.errors import ClpError

MIN_LETTERS = 3
MIN_EXPECTED = 0.1  # below this P(expected language), an answer is in a wrong language


@functools.lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier  # 1-2 s to load: only when answers are checked

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def known_languages() -> list[str]:
    """ISO 639-1 codes the model knows."""
    return list(_identifier().labels)


def language_probabilities(text: str, candidates: Iterable[str]) -> dict[str, float]:
    """P(language | text) over `candidates` only (py3langid's normalized scores, renormalized)."""
    candidates = list(dict.fromkeys(candidates))
    unknown = sorted(set(candidates) - set(known_languages()))
    if unknown:
        raise ClpError(f"language ID knows no language {', '.join(map(repr, unknown))} "
                       "(py3langid uses ISO 639-1 codes such as 'en', 'fr', 'zh')")
    scores = {lang: p for lang, p in _identifier().rank(text) if lang in candidates}
    total = sum(scores.values())
    return {lang: (scores[lang] / total if total > 0 else 1 / len(candidates)) for lang in candidates}


def _letters(text: str) -> int:
    return sum(unicodedata.category(ch)[0] == "L" for ch in text)


def identify(text: str, candidates: Iterable[str]) -> str | None:
    """The most probable candidate language of `text`, or None when it has fewer than MIN_LETTERS letters."""
    if _letters(text) < MIN_LETTERS:
        return None
    probabilities = language_probabilities(text, candidates)
    return max(probabilities, key=probabilities.__getitem__)


def in_expected_language(predictions: Sequence[str], expected: str, candidates: Iterable[str]) -> list[bool]:
    """Per answer: False when it has MIN_LETTERS letters and P(`expected`) among the candidates is below
    MIN_EXPECTED, else True."""
    pool = list(dict.fromkeys([expected, *candidates]))
    return [_letters(p) < MIN_LETTERS or language_probabilities(p, pool)[expected] >= MIN_EXPECTED
            for p in predictions]
