"""Language ID of generated answers: known sentences, a wrong-language answer, answers too short to tell."""

import pytest

from clp_jax.errors import ClpError
from clp_jax.eval.language_id import identify, in_expected_language, language_probabilities

CANDIDATES = ["en", "fr", "es", "de", "it"]
SENTENCES = {
    "en": "The weather was lovely yesterday, so we walked along the river until the sun went down.",
    "fr": "Il faisait très beau hier, alors nous avons marché le long de la rivière jusqu'au coucher du soleil.",
    "es": "Ayer hizo muy buen tiempo, así que caminamos por la orilla del río hasta que se puso el sol.",
    "de": "Gestern war das Wetter sehr schön, deshalb sind wir am Fluss entlang gelaufen, bis die Sonne unterging.",
    "it": "Ieri il tempo era bellissimo, così abbiamo camminato lungo il fiume fino al tramonto del sole.",
}


@pytest.mark.parametrize("language", CANDIDATES)
def test_known_sentences_are_identified(language):
    assert identify(SENTENCES[language], CANDIDATES) == language
    probabilities = language_probabilities(SENTENCES[language], CANDIDATES)
    assert set(probabilities) == set(CANDIDATES) and sum(probabilities.values()) == pytest.approx(1.0)


def test_wrong_language_answers_are_flagged_and_unclear_ones_are_not():
    answers = [SENTENCES["fr"], SENTENCES["en"], "La réponse est 12.", "The answer is 12.", "12.", "", "Oui"]
    assert in_expected_language(answers, "fr", CANDIDATES) == [True, False, True, False, True, True, True]
    assert identify("12.", CANDIDATES) is None and identify("", CANDIDATES) is None  # fewer than 3 letters
    # Only the candidates count: Spanish text checked among English and French is not called wrong.
    assert in_expected_language([SENTENCES["es"]], "fr", ["en", "fr"]) == [True]
    assert in_expected_language([SENTENCES["es"]], "fr", ["en", "fr", "es"]) == [False]


def test_unknown_language_code():
    with pytest.raises(ClpError, match="knows no language 'xx'"):
        language_probabilities("hello", ["en", "xx"])
