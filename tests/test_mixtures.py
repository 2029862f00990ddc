"""Data mixtures: UniMax against its published example, temperature sampling against numpy, and the errors."""

import json

import numpy as np
import pytest

from clp_jax.config import config_to_dict, load_config
from clp_jax.data.mixtures import (
    Mixture,
    MixtureConfig,
    build_mixture,
    explicit_mixture,
    fixed_english_plus_n,
    posttrain_mixture,
    temperature_mixture,
    unimax_mixture,
)
from clp_jax.errors import ClpError

# Chung et al. 2023 (UniMax), worked example: character counts, a 250B-character budget, at most 4 epochs.
UNIMAX_SIZES = {"swe": 179_955_884_499, "fas": 184_595_788_282, "ekk": 42_541_080_893, "isl": 10_027_573_389,
                "fao": 549_707_867}
SIZES = {"en": 1_000_000, "de": 100_000, "sw": 1_000}


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(ClpError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unimax_reproduces_the_published_example():
    mix = unimax_mixture(UNIMAX_SIZES, 250e9, max_epochs=4)
    assert mix.names == tuple(UNIMAX_SIZES)
    assert mix.budget == pytest.approx(250e9) and mix.leftover == 0
    assert sum(mix.weights) == pytest.approx(1)
    units, epochs = mix.expected_units(), mix.epochs()
    assert units["fao"] == pytest.approx(2_198_831_468, abs=0.01)
    assert units["isl"] == pytest.approx(40_110_293_556, abs=0.01)
    for lang in ("ekk", "swe", "fas"):
        assert units[lang] == pytest.approx(69_230_291_658.67, abs=0.01)
    assert sum(units.values()) == pytest.approx(250e9, abs=1e-3)
    assert epochs["fao"] == pytest.approx(4) and epochs["isl"] == pytest.approx(4)
    assert epochs["ekk"] == pytest.approx(69_230_291_658.67 / 42_541_080_893)
    assert all(e < 4 for lang, e in epochs.items() if lang in ("ekk", "swe", "fas"))


def test_unimax_budget_beyond_every_cap_reports_leftover():
    mix = unimax_mixture(SIZES, 1e9, max_epochs=2)
    assert mix.expected_units() == pytest.approx({n: 2 * s for n, s in SIZES.items()})
    assert mix.budget == pytest.approx(2 * sum(SIZES.values()))
    assert mix.leftover == pytest.approx(1e9 - 2 * sum(SIZES.values()))
    assert all(e == pytest.approx(2) for e in mix.epochs().values())
    assert mix.to_dict()["leftover"] == pytest.approx(1e9 - 2 * sum(SIZES.values()))


def test_unimax_errors():
    assert "fo has no data" in error(unimax_mixture, {"en": 10, "fo": 0}, 100, 4)
    assert "max_epochs" in error(unimax_mixture, SIZES, 100, 0)
    assert "budget must be positive" in error(unimax_mixture, SIZES, 0, 4)


def test_temperature_proportional_uniform_and_numpy():
    total = sum(SIZES.values())
    proportional = temperature_mixture(SIZES, alpha=1.0)
    assert proportional.weights == pytest.approx([s / total for s in SIZES.values()])
    assert temperature_mixture(SIZES, alpha=0.0).weights == pytest.approx([1 / 3] * 3)

    n = np.array(list(SIZES.values()), dtype=np.float64)
    expected = n**0.3 / np.sum(n**0.3)
    mix = temperature_mixture(SIZES, alpha=0.3, budget=1e6)
    np.testing.assert_allclose(mix.weights, expected, rtol=1e-12)
    np.testing.assert_allclose(list(mix.epochs().values()), expected * 1e6 / n, rtol=1e-12)

    low = [temperature_mixture(SIZES, alpha=a).weights[2] for a in (1.0, 0.7, 0.3, 0.0)]
    assert low == sorted(low) and low[0] < low[-1]


def test_temperature_errors():
    assert "between 0 and 1" in error(temperature_mixture, SIZES, alpha=1.5)
    assert "between 0 and 1" in error(temperature_mixture, SIZES, alpha=-0.1)
    assert "sw has no data" in error(temperature_mixture, {**SIZES, "sw": 0}, alpha=0.3)
    assert "no sources" in error(temperature_mixture, {}, alpha=0.3)


def test_explicit_normalizes():
    mix = explicit_mixture(SIZES, {"en": 2, "de": 1, "sw": 1}, budget=4000)
    assert mix.names == ("en", "de", "sw")
    assert mix.weights == pytest.approx([0.5, 0.25, 0.25])
    assert mix.expected_units() == pytest.approx({"en": 2000, "de": 1000, "sw": 1000})
    assert mix.epochs() == pytest.approx({"en": 0.002, "de": 0.01, "sw": 1.0})
    empty_but_unused = explicit_mixture({**SIZES, "fo": 0}, {"en": 1, "de": 0, "sw": 0, "fo": 0}, budget=10)
    assert empty_but_unused.epochs()["fo"] == 0


def test_explicit_errors():
    assert "all mixture weights are zero" in error(explicit_mixture, SIZES, {"en": 0, "de": 0, "sw": 0})
    assert "weight of de must be >= 0" in error(explicit_mixture, SIZES, {"en": 1, "de": -1, "sw": 0})
    assert "unknown sources: fr" in error(explicit_mixture, SIZES, {"en": 1, "de": 1, "sw": 1, "fr": 1})
    assert "missing for: sw" in error(explicit_mixture, SIZES, {"en": 1, "de": 1})
    assert "language fo has no data" in error(explicit_mixture, {**SIZES, "fo": 0},
                                              {"en": 1, "de": 1, "sw": 1, "fo": 0.5})


def test_fixed_english_plus_n():
    available = {"en": 50_000, "de": 2_000, "sw": 500, "yo": 0}
    counts = fixed_english_plus_n(available, english_budget=10_000, per_language=400, languages=["de", "sw"])
    assert counts == {"en": 10_000, "de": 400, "sw": 400}
    mix = posttrain_mixture(available, english_budget=10_000, per_language=400, languages=["de", "sw"])
    assert mix.names == ("en", "de", "sw") and mix.budget == 10_800
    assert mix.weights == pytest.approx([10_000 / 10_800, 400 / 10_800, 400 / 10_800])
    assert mix.expected_units() == pytest.approx(counts)
    assert mix.epochs() == pytest.approx({"en": 0.2, "de": 0.2, "sw": 0.8})


def test_fixed_english_plus_n_errors():
    available = {"en": 50_000, "de": 2_000, "sw": 500, "yo": 0}
    kw = {"english_budget": 10_000, "per_language": 600}
    assert "sw has only 500 examples, fewer than the 600" in error(fixed_english_plus_n, available, **kw,
                                                                    languages=["de", "sw"])
    assert "language yo has no data" in error(fixed_english_plus_n, available, **kw, languages=["yo"])
    assert "language fr has no data" in error(fixed_english_plus_n, available, **kw, languages=["fr"])
    assert "de is listed twice" in error(fixed_english_plus_n, available, **kw, languages=["de", "de"])
    assert "en is English" in error(fixed_english_plus_n, available, **kw, languages=["en", "de"])
    assert "en has only 50000" in error(fixed_english_plus_n, available, english_budget=60_000, per_language=1,
                                        languages=["de"])


def load(tmp_path, text: str) -> MixtureConfig:
    path = tmp_path / "mixture.yaml"
    path.write_text(text)
    return load_config(MixtureConfig, path)


def test_build_mixture_dispatches_from_yaml(tmp_path):
    explicit = build_mixture(load(tmp_path, "kind: explicit\nweights: {en: 2, de: 1, sw: 1}\n"), SIZES)
    assert explicit == explicit_mixture(SIZES, {"en": 2, "de": 1, "sw": 1})
    temperature = build_mixture(load(tmp_path, "kind: temperature\nalpha: 0.5\nbudget: 1.0e6\n"), SIZES)
    assert temperature == temperature_mixture(SIZES, 0.5, 1e6)
    unimax = build_mixture(load(tmp_path, "kind: unimax\nbudget: 250.0e9\nmax_epochs: 4\n"), UNIMAX_SIZES)
    assert unimax == unimax_mixture(UNIMAX_SIZES, 250e9, 4)
    text = "kind: english_plus_n\nenglish_budget: 1000\nper_language: 100\nlanguages: [de, sw]\n"
    post = build_mixture(load(tmp_path, text), SIZES)
    assert post == posttrain_mixture(SIZES, english_budget=1000, per_language=100, languages=["de", "sw"])
    # a resolved config saved with the run (defaults included) builds the same mixture
    resolved = MixtureConfig.model_validate(config_to_dict(load(tmp_path, text)))
    assert build_mixture(resolved, SIZES) == post


def test_build_mixture_errors(tmp_path):
    assert "'unimax' needs 'budget'" in error(build_mixture, load(tmp_path, "kind: unimax\n"), SIZES)
    assert "'explicit' needs 'weights'" in error(build_mixture, load(tmp_path, "kind: explicit\n"), SIZES)
    assert "needs 'languages'" in error(build_mixture, load(tmp_path, "kind: english_plus_n\nper_language: 5\n"),
                                        SIZES)
    cfg = load(tmp_path, "kind: english_plus_n\nlanguages: [de]\n")
    assert "needs 'per_language' > 0" in error(build_mixture, cfg, SIZES)
    assert "does not use 'alpha'" in error(build_mixture, load(tmp_path, "kind: unimax\nbudget: 10\nalpha: 0.5\n"),
                                           SIZES)
    assert "mixture.yaml" in error(load, tmp_path, "kind: uniform\n")
    assert "all mixture weights are zero" in error(build_mixture,
                                                   load(tmp_path, "kind: explicit\nweights: {en: 0, de: 0, sw: 0}\n"),
                                                   SIZES)


TASK_SIZES = {"math-en": 100, "chat-en": 80, "math-de": 30, "chat-de": 20, "math-sw": 5}
TASK_LANGUAGES = {"math-en": "en", "chat-en": "en", "math-de": "de", "chat-de": "de", "math-sw": "sw"}


def test_english_plus_n_selects_sources_by_language_code_or_name(tmp_path):
    text = "kind: english_plus_n\nenglish: en\nenglish_budget: 50\nper_language: 10\nlanguages: [de]\n"
    mix = build_mixture(load(tmp_path, text), TASK_SIZES, TASK_LANGUAGES)
    assert mix.names == ("math-en", "chat-en", "math-de", "chat-de") and mix.budget == 120
    assert mix.expected_units() == pytest.approx({"math-en": 50, "chat-en": 50, "math-de": 10, "chat-de": 10})
    assert mix.sizes == (100, 80, 30, 20)
    by_name = "kind: english_plus_n\nenglish: math-en\nenglish_budget: 50\nper_language: 10\nlanguages: [de, math-sw]\n"
    mixed = build_mixture(load(tmp_path, by_name.replace("10\n", "5\n")), TASK_SIZES, TASK_LANGUAGES)
    assert mixed.names == ("math-en", "math-de", "chat-de", "math-sw")  # names and codes together
    assert mixed.expected_units() == pytest.approx({"math-en": 50, "math-de": 5, "chat-de": 5, "math-sw": 5})


def test_english_plus_n_selection_errors():
    kw = {"english_budget": 50, "per_language": 10, "source_languages": TASK_LANGUAGES}
    missing = error(posttrain_mixture, TASK_SIZES, **kw, languages=["fr"])
    assert missing.count("\n") == 0 and "language fr has no data" in missing
    assert "languages: de, en, sw" in missing and "sources: math-en, chat-en, math-de, chat-de, math-sw" in missing
    assert "source math-sw (sw) has only 5 examples, fewer than the 10" in error(posttrain_mixture, TASK_SIZES, **kw,
                                                                                 languages=["sw"])
    assert "math-de is selected twice" in error(posttrain_mixture, TASK_SIZES, **kw, languages=["de", "math-de"])
    assert "language de is listed twice" in error(posttrain_mixture, TASK_SIZES, **kw, languages=["de", "de"])


def test_to_dict():
    mix = unimax_mixture(UNIMAX_SIZES, 250e9, max_epochs=4)
    data = json.loads(json.dumps(mix.to_dict()))
    assert [row["name"] for row in data["sources"]] == list(UNIMAX_SIZES)
    assert [row["share"] for row in data["sources"]] == pytest.approx(list(mix.weights))
    assert data["sources"][4]["units"] == pytest.approx(2_198_831_468, abs=0.01)
    assert data["sources"][4]["epochs"] == pytest.approx(4)
    assert set(data["sources"][0]) == {"name", "size", "share", "units", "epochs"}

    no_budget = temperature_mixture(SIZES, 0.3)
    assert json.loads(json.dumps(no_budget.to_dict()))["sources"][0]["units"] is None
    assert "no budget" in error(no_budget.epochs)
    assert isinstance(no_budget, Mixture)
