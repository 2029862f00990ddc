"""Generation metrics per language and task: exact match on the final number, chrF, ROUGE-L, and their
averages over seen and unseen languages with the gap between them.

Every score that `score_task` returns is on a 0-100 scale (exact match and ROUGE-L as percentages, chrF as
sacrebleu reports it), so one table holds them all; given which answers are in the expected language, it adds
`language_ok` and `<score>_lang` with the others counted as failures. Pure functions: the caller prints and saves.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal, InvalidOperation

from rouge_score import rouge_scorer, tokenizers
from sacrebleu.metrics import CHRF

from clp_jax.errors import ClpError

MATH_KINDS = ("math",)
OVERLAP_KINDS = ("summarization", "dialogue", "open")
TASK_KINDS = MATH_KINDS + OVERLAP_KINDS

_NUMBER_RUN = re.compile(r"\d+(?:[.,]\d+)*")
_MINUS_SIGNS = "-\u2212\uff0d\u2012\u2013"  # hyphen-minus, minus sign, fullwidth, figure dash, en dash
_SEPARATORS = {"\u066b": ".", "\u066c": ","}  # Arabic decimal and thousands separators


def _ascii_digits(text: str) -> str:
    """`text` with every Unicode decimal digit as its ASCII digit, minus signs as '-' (same length)."""
    out = []
    for ch in text:
        if ch.isdecimal():
            out.append(str(unicodedata.decimal(ch)))
        elif ch in _MINUS_SIGNS:
            out.append("-")
        else:
            out.append(_SEPARATORS.get(ch, ch))
    return "".join(out)


def _plain_number(run: str) -> str:
    """A digit run with '.'/',' separators as a plain decimal string ('1,234.5' -> '1234.5')."""
    if "," in run and "." in run:  # the later separator is the decimal one: '1,234.5' and '1.234,5'
        decimal, thousands = (".", ",") if run.rfind(".") > run.rfind(",") else (",", ".")
        whole, _, frac = run.rpartition(decimal)
        return whole.replace(thousands, "") + "." + frac
    for sep in ",.":
        if sep not in run:
            continue
        groups = run.split(sep)
        if len(groups[0]) <= 3 and all(len(g) == 3 for g in groups[1:]) and (sep == "," or len(groups) > 2):
            return "".join(groups)  # thousands groups: '1,234', '12,345,678', '1.234.567'
        if len(groups) == 2:
            return groups[0] + "." + groups[1]  # one decimal separator: '2.5', '2,5', '1.234'
        return groups[-1]  # a list or version string such as '3,4,5': its last number
    return run


def _canonical(number: str) -> str:
    """'3.0' -> '3', '-0' -> '0', '007' -> '7', '2.50' -> '2.5': one spelling per value."""
    try:
        value = Decimal(number)
    except InvalidOperation:  # not reachable for runs of the pattern; kept as a guard
        return number
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_final_number(text: str) -> str | None:
    """The last number in `text` as a canonical decimal string, or None when it has none.

    Digits of any script count ('١٢' is 12); ',' between groups of three is a thousands separator ('1,234'),
    a single ',' or '.' otherwise a decimal one ('2,5' = '2.5'); with both, the later one is decimal. A '-'
    directly before the number, not after a letter or digit, makes it negative ('-3'; '8-3' ends in 3).
    Numerically equal spellings are equal: '3.0', '3' and '3.00' all give '3', so exact match compares values.
    """
    normalized = _ascii_digits(text)
    matches = list(_NUMBER_RUN.finditer(normalized))
    if not matches:
        return None
    last = matches[-1]
    start = last.start()
    negative = start > 0 and normalized[start - 1] == "-" and (start < 2 or not normalized[start - 2].isalnum())
    return _canonical(("-" if negative else "") + _plain_number(last.group()))


def _same_text(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def exact_match(prediction: str, reference: str, numeric: bool = True) -> float:
    """1.0 when the prediction's final number equals the reference's (numeric), or the whitespace-normalized
    texts are equal (not numeric); else 0.0. A numeric reference without a number is a ClpError."""
    if not numeric:
        return float(_same_text(prediction) == _same_text(reference))
    expected = extract_final_number(reference)
    if expected is None:
        raise ClpError(f"exact match on numbers: the reference {reference[:80]!r} has no number")
    return float(extract_final_number(prediction) == expected)


def _check_pairs(predictions: Sequence[str], references: Sequence[str], what: str) -> None:
    if len(predictions) != len(references):
        raise ClpError(f"{what}: {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ClpError(f"{what}: no predictions to score")


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus-level chrF (sacrebleu's CHRF defaults: character 6-grams, beta 2), 0-100."""
    _check_pairs(predictions, references, "chrF")
    return float(CHRF().corpus_score(list(predictions), [list(references)]).score)


class UnicodeWordTokenizer(tokenizers.Tokenizer):
    """Case-folded words of any script: runs of letters, combining marks and digits; CJK characters alone.

    rouge_score's default tokenizer keeps only [a-z0-9] (everything else becomes a space), so Cyrillic,
    Devanagari or Arabic text has no tokens and scores 0; Python's `\\w` would also split Indic words at their
    vowel signs (category Mc/Mn). Kana and Han characters, written without spaces, are one token each.
    No stemming: rouge_score's Porter stemmer is English-only.
    """

    def tokenize(self, text: str) -> list[str]:
        tokens: list[str] = []
        word: list[str] = []
        for ch in unicodedata.normalize("NFC", text).casefold():
            if _is_cjk(ch):
                tokens.extend(["".join(word), ch] if word else [ch])
                word = []
            elif unicodedata.category(ch)[0] in "LMN":
                word.append(ch)
            elif word:
                tokens.append("".join(word))
                word = []
        if word:
            tokens.append("".join(word))
        return tokens


def _is_cjk(ch: str) -> bool:
    code = ord(ch)
    return (0x3040 <= code <= 0x30FF or 0x3400 <= code <= 0x4DBF or 0x4E00 <= code <= 0x9FFF
            or 0xF900 <= code <= 0xFAFF or 0x20000 <= code <= 0x3FFFF)


_ROUGE_L = rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeWordTokenizer())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (0-1) of one prediction: rouge_score's LCS over `UnicodeWordTokenizer` words.

    rouge-score (Google's maintained implementation of Lin 2004) does the LCS and F-measure; only its
    tokenizer is replaced, because the default one drops every non-ASCII character.
    """
    return float(_ROUGE_L.score(reference, prediction)["rougeL"].fmeasure)


def task_metrics(task_kind: str) -> tuple[str, ...]:
    """The names `score_task` gives a kind's scores (with `language_ok`: the language check's too)."""
    if task_kind not in TASK_KINDS:
        raise ClpError(f"unknown task kind '{task_kind}' (known: {', '.join(TASK_KINDS)})")
    base = ("exact_match",) if task_kind in MATH_KINDS else ("chrf", "rouge_l")
    return (*base, "language_ok", *(f"{m}_lang" for m in base))


def score_task(task_kind: str, predictions: Sequence[str], references: Sequence[str],
               language_ok: Sequence[bool] | None = None) -> dict[str, float]:
    """Scores of one task in one language, 0-100: math -> exact_match; summarization, dialogue, open ->
    chrf (corpus level) and rouge_l (mean of per-example F-measures).

    With `language_ok` (per answer: not in a wrong language), also its share `language_ok` and each score
    with wrong-language answers as failures: `exact_match_lang` and `rouge_l_lang` count them as 0,
    `chrf_lang` scores them as empty answers.
    """
    _check_pairs(predictions, references, f"task kind '{task_kind}'")
    task_metrics(task_kind)
    if language_ok is not None and len(language_ok) != len(predictions):
        raise ClpError(f"language check: {len(language_ok)} flags for {len(predictions)} predictions")
    ok = [float(bool(x)) for x in language_ok or ()]
    if task_kind in MATH_KINDS:
        matches = [exact_match(p, r) for p, r in zip(predictions, references)]
        scores = {"exact_match": _percent(matches)}
        if language_ok is None:
            return scores
        penalized = [m * k for m, k in zip(matches, ok)]
        return {**scores, "language_ok": _percent(ok), "exact_match_lang": _percent(penalized)}
    rouge = [rouge_l(p, r) for p, r in zip(predictions, references)]
    scores = {"chrf": chrf(predictions, references), "rouge_l": _percent(rouge)}
    if language_ok is None:
        return scores
    kept = [p if k else "" for p, k in zip(predictions, ok)]
    return {**scores, "language_ok": _percent(ok), "chrf_lang": chrf(kept, references),
            "rouge_l_lang": _percent([r * k for r, k in zip(rouge, ok)])}


def _percent(values: Sequence[float]) -> float:
    return 100.0 * sum(values) / len(values)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _per_language(results: Iterable[Mapping]) -> dict[str, dict[str, dict[str, float]]]:
    """{task: {language: {metric: value}}} from flat results, each (task, language) once."""
    per_language: dict[str, dict[str, dict[str, float]]] = {}
    for i, result in enumerate(results):
        if "language" not in result or "task" not in result:
            raise ClpError(f"result {i} needs 'language' and 'task' keys (found: {', '.join(map(str, result))})")
        language, task = result["language"], result["task"]
        if language in per_language.get(task, {}):
            raise ClpError(f"result {i}: task '{task}' in language '{language}' is scored twice")
        per_language.setdefault(task, {})[language] = {k: float(v) for k, v in result.items()
                                                       if k not in ("language", "task")}
    return per_language


def aggregate(results: Iterable[Mapping], seen_languages: Iterable[str],
              unseen_languages: Iterable[str] | None = None) -> dict:
    """Per-language scores and, per task and metric, the mean over seen and over unseen languages and the gap.

    Each result is `{"language": ..., "task": ..., metric: value, ...}`; every other key is a metric. Unseen
    languages are those of `unseen_languages` (default: every language not seen); a language in neither list
    (English in a CLT study) is in no mean. Returns `{"per_language": {task: {lang: {metric: v}}}, "languages":
    {task: {"seen": [...], "unseen": [...]}}, "seen": {task: {metric: mean}}, "unseen": {...}, "gap": {task:
    {metric: seen - unseen}}}`; means are unweighted over languages, and a mean (and so the gap) is None when
    its group has no language.
    """
    seen = set(seen_languages)
    unseen = None if unseen_languages is None else set(unseen_languages) - seen
    per_language = _per_language(results)
    out: dict = {"per_language": per_language, "languages": {}, "seen": {}, "unseen": {}, "gap": {}}
    for task, by_language in per_language.items():
        groups = {"seen": [lang for lang in by_language if lang in seen],
                  "unseen": [lang for lang in by_language if lang not in seen and (unseen is None or lang in unseen)]}
        out["languages"][task] = groups
        metrics = list(dict.fromkeys(m for scores in by_language.values() for m in scores))
        for group, languages in groups.items():
            out[group][task] = {m: _mean([by_language[lang][m] for lang in languages if m in by_language[lang]])
                                for m in metrics}
        out["gap"][task] = {m: None if out["seen"][task][m] is None or out["unseen"][task][m] is None
                            else out["seen"][task][m] - out["unseen"][task][m] for m in metrics}
    return out
