"""Generation metrics on hand-checked cases: final numbers, exact match, chrF, ROUGE-L, seen/unseen averages."""

import pytest
from rouge_score import rouge_scorer
from sacrebleu.metrics import CHRF

from clp_jax.errors import ClpError
from clp_jax.eval.metrics import (
    UnicodeWordTokenizer,
    aggregate,
    chrf,
    exact_match,
    extract_final_number,
    rouge_l,
    score_task,
    task_metrics,
)


@pytest.mark.parametrize("text, expected", [
    ("The answer is 8.", "8"),
    ("5 + 3 = 8, so 8", "8"),
    ("She pays 1,234 dollars", "1234"),
    ("12,345,678 people", "12345678"),
    ("The temperature is -3 today", "-3"),
    ("x = −7", "-7"),  # U+2212 minus sign
    ("8-3", "3"),  # a hyphen between numbers is no sign
    ("It costs 2.5 euros.", "2.5"),
    ("Es kostet 2,5 Euro.", "2.5"),  # one comma: decimal comma
    ("1.234,5 und 1,234.5", "1234.5"),  # both separators: the later one is decimal
    ("3.0", "3"),  # numerically equal spellings are equal
    ("2.50", "2.5"),
    ("007", "7"),
    ("الجواب هو ١٢", "12"),  # Arabic-Indic digits
    ("٣٫٥", "3.5"),  # Arabic decimal separator
    ("उत्तर १२३ है", "123"),  # Devanagari digits
    ("答えは１５です", "15"),  # fullwidth digits
    ("first 4, then 9 and finally 10.", "10"),
    ("no number here", None),
    ("", None),
])
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


def test_exact_match():
    assert exact_match("3 + 5 = 8. The answer is 8.", "8") == 1.0
    assert exact_match("The answer is 8.0", "#### 8") == 1.0
    assert exact_match("The answer is 9.", "8") == 0.0
    assert exact_match("I do not know.", "8") == 0.0
    assert exact_match("١٢", "12") == 1.0
    assert exact_match("  Paris \n", "Paris", numeric=False) == 1.0
    assert exact_match("paris", "Paris", numeric=False) == 0.0
    with pytest.raises(ClpError, match="has no number"):
        exact_match("8", "eight")


def test_chrf_identical_disjoint_and_hand_computed():
    assert chrf(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert chrf(["abc"], ["xyz"]) == 0.0
    # "ab" vs "abc" (beta 2): unigrams P=2/2, R=2/3; bigrams P=1/1, R=1/2; longer orders have no hypothesis
    # n-grams and are left out. Mean P=1, R=7/12; F = 5*P*R / (4P + R) = 7/11.
    assert chrf(["ab"], ["abc"]) == pytest.approx(700 / 11)
    # Corpus level adds the statistics: unigrams P=3/3, R=3/4; bigrams P=1/1, R=1/2 -> R=5/8, F=25/37.
    assert chrf(["ab", "x"], ["abc", "x"]) == pytest.approx(2500 / 37)


def test_chrf_matches_sacrebleu_sentence_score():
    hyp, ref = "Die Katze sitzt auf der Matte.", "Die Katze saß auf der Matte."
    assert chrf([hyp], [ref]) == pytest.approx(CHRF().sentence_score(hyp, [ref]).score)


def test_chrf_errors():
    with pytest.raises(ClpError, match="2 predictions but 1 references"):
        chrf(["a", "b"], ["a"])
    with pytest.raises(ClpError, match="no predictions"):
        chrf([], [])


def test_rouge_l_hand_computed():
    # LCS("the cat on the mat", "the cat sat on the mat") = 5: P = 5/5, R = 5/6, F = 2PR/(P+R) = 10/11.
    assert rouge_l("the cat on the mat", "the cat sat on the mat") == pytest.approx(10 / 11)
    assert rouge_l("The Cat, on the MAT!", "the cat sat on the mat") == pytest.approx(10 / 11)
    assert rouge_l("a b c", "a b c") == pytest.approx(1.0)
    assert rouge_l("x y", "a b c") == 0.0


def test_rouge_l_non_latin_text():
    # Russian: LCS 3 of 3 predicted and 4 reference words: P = 1, R = 3/4, F = 6/7.
    pred, ref = "Кошка на ковре", "кошка сидит на ковре"
    assert rouge_l(pred, ref) == pytest.approx(6 / 7)
    ascii_only = rouge_scorer.RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure
    assert ascii_only == 0.0  # why rouge_score's default tokenizer is not used
    # Hindi: vowel signs (Mn/Mc) stay inside words; 3 of 4 words in order: P = R = F = 3/4.
    assert rouge_l("मैं घर जाती हूँ", "मैं घर जाता हूँ") == pytest.approx(0.75)
    assert UnicodeWordTokenizer().tokenize("हिन्दी भाषा।") == ["हिन्दी", "भाषा"]
    # Japanese: one token per character; LCS 2, P = 1, R = 2/3, F = 0.8.
    assert rouge_l("日本", "日本語") == pytest.approx(0.8)


def test_score_task_dispatches_by_kind():
    assert score_task("math", ["so 8", "The answer is 7."], ["8", "9"]) == {"exact_match": 50.0}
    scores = score_task("summarization", ["the cat on the mat"], ["the cat sat on the mat"])
    assert set(scores) == {"chrf", "rouge_l"}
    assert scores["rouge_l"] == pytest.approx(100 * 10 / 11)
    assert scores["chrf"] == pytest.approx(chrf(["the cat on the mat"], ["the cat sat on the mat"]))
    assert score_task("dialogue", ["hi there"], ["hi there"]) == pytest.approx({"chrf": 100.0, "rouge_l": 100.0})
    with pytest.raises(ClpError, match="unknown task kind 'translation'"):
        score_task("translation", ["a"], ["a"])
    with pytest.raises(ClpError, match="1 predictions but 2 references"):
        score_task("math", ["1"], ["1", "2"])


def test_aggregate_seen_unseen_means_and_gap():
    results = [
        {"language": "en", "task": "math", "exact_match": 80.0},
        {"language": "de", "task": "math", "exact_match": 60.0},
        {"language": "sw", "task": "math", "exact_match": 20.0},
        {"language": "yo", "task": "math", "exact_match": 40.0},
        {"language": "en", "task": "summarization", "chrf": 50.0, "rouge_l": 40.0},
        {"language": "sw", "task": "summarization", "chrf": 30.0, "rouge_l": 20.0},
        {"language": "de", "task": "dialogue", "chrf": 10.0},
    ]
    out = aggregate(results, seen_languages=["en", "de"])
    assert out["per_language"]["math"]["sw"] == {"exact_match": 20.0}
    assert out["languages"]["math"] == {"seen": ["en", "de"], "unseen": ["sw", "yo"]}
    assert out["seen"]["math"] == {"exact_match": 70.0}
    assert out["unseen"]["math"] == {"exact_match": 30.0}
    assert out["gap"]["math"] == {"exact_match": 40.0}
    assert out["seen"]["summarization"] == {"chrf": 50.0, "rouge_l": 40.0}
    assert out["unseen"]["summarization"] == {"chrf": 30.0, "rouge_l": 20.0}
    assert out["gap"]["summarization"] == {"chrf": 20.0, "rouge_l": 20.0}
    assert out["unseen"]["dialogue"] == {"chrf": None} and out["gap"]["dialogue"] == {"chrf": None}


def test_aggregate_leaves_languages_in_neither_list_out_of_the_means():
    results = [{"language": lang, "task": "math", "exact_match": v}
               for lang, v in {"en": 90.0, "de": 60.0, "sw": 20.0, "yo": 40.0}.items()]
    out = aggregate(results, seen_languages=["de"], unseen_languages=["sw", "yo"])
    assert out["languages"]["math"] == {"seen": ["de"], "unseen": ["sw", "yo"]}
    assert out["per_language"]["math"]["en"] == {"exact_match": 90.0}
    assert (out["seen"]["math"], out["unseen"]["math"]) == ({"exact_match": 60.0}, {"exact_match": 30.0})
    assert out["gap"]["math"] == {"exact_match": 30.0}
    assert aggregate(results, ["de"])["unseen"]["math"] == {"exact_match": 50.0}  # default: en counts as unseen


def test_aggregate_errors():
    with pytest.raises(ClpError, match="'math' in language 'de' is scored twice"):
        aggregate([{"language": "de", "task": "math", "exact_match": 1.0}] * 2, ["de"])
    with pytest.raises(ClpError, match="result 0 needs 'language' and 'task'"):
        aggregate([{"task": "math", "exact_match": 1.0}], ["de"])


def test_wrong_language_answers_count_as_failures():
    # 4 math answers, 3 right; the second right one is in the wrong language: 75 -> 50, language_ok 75.
    scores = score_task("math", ["8", "so 9", "7", "1"], ["8", "9", "7", "2"], language_ok=[True, False, True, True])
    assert scores == {"exact_match": 75.0, "language_ok": 75.0, "exact_match_lang": 50.0}
    # ROUGE-L F per example: 10/11 (in language) and 1 (wrong language) -> mean 100 * (10/11 + 1) / 2 and
    # 100 * (10/11 + 0) / 2.
    preds, refs = ["the cat on the mat", "a b"], ["the cat sat on the mat", "a b"]
    scores = score_task("summarization", preds, refs, language_ok=[True, False])
    assert scores["rouge_l"] == pytest.approx(100 * (10 / 11 + 1) / 2)
    assert scores["rouge_l_lang"] == pytest.approx(100 * (10 / 11) / 2)
    assert scores["language_ok"] == 50.0
    assert list(scores) == list(task_metrics("summarization"))
    # chrF scores a wrong-language answer as "": ("ab", "x") vs ("abc", "x") is 2500/37 (above); with "x"
    # wrong, ("ab", "") gives unigrams P=2/2, R=2/4, bigrams P=1/1, R=1/2 -> R=1/2, F = 5R / (4 + R) = 5/9.
    scores = score_task("dialogue", ["ab", "x"], ["abc", "x"], language_ok=[True, False])
    assert scores["chrf"] == pytest.approx(2500 / 37) and scores["chrf_lang"] == pytest.approx(500 / 9)
    assert score_task("dialogue", ["ab"], ["abc"], language_ok=[False])["chrf_lang"] == 0.0
    with pytest.raises(ClpError, match="1 flags for 2 predictions"):
        score_task("math", ["1", "2"], ["1", "2"], language_ok=[True])


def test_task_metrics_names_what_score_task_returns():
    assert task_metrics("math") == ("exact_match", "language_ok", "exact_match_lang")
    assert list(score_task("math", ["1"], ["1"], language_ok=[True])) == list(task_metrics("math"))
    with pytest.raises(ClpError, match="unknown task kind"):
        task_metrics("poetry")
