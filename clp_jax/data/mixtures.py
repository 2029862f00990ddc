"""Multilingual data mixtures: how much of each source (language) to draw, and how many epochs that costs.

Explicit weights, temperature sampling (p_l proportional to n_l^alpha), UniMax (Chung et al. 2023) and the
post-training design "fixed English budget plus N examples per language" (Shimabucoro et al. 2025).
Pure functions: the run's data report (`data.pipeline.Data`) shows each source's share and epochs and the
leftover, and carries `Mixture.to_dict()` into data_report.json.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from clp_jax.config import ConfigModel
from clp_jax.errors import ClpError


@dataclass(frozen=True)
class Mixture:
    """Sampling probabilities over named sources; `budget` is the total units drawn, `leftover` what could not be."""

    names: tuple[str, ...]
    sizes: tuple[float, ...]
    weights: tuple[float, ...]
    budget: float | None = None
    leftover: float = 0.0

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.sizes) == len(self.weights):
            raise ValueError("Mixture: names, sizes and weights must have the same length")

    def expected_units(self) -> dict[str, float]:
        """Units expected from each source: weight * budget."""
        if self.budget is None:
            raise ClpError("the mixture has no budget: set one to get units and epochs per source")
        return {n: w * self.budget for n, w in zip(self.names, self.weights)}

    def epochs(self) -> dict[str, float]:
        """Expected passes over each source: expected units / size (0 for a source not drawn from)."""
        units = self.expected_units()
        return {n: units[n] / s if units[n] else 0.0 for n, s in zip(self.names, self.sizes)}

    def table(self) -> list[dict]:
        """One row per source: name, size, share, units and epochs (the last two None without a budget)."""
        units = self.expected_units() if self.budget is not None else {}
        epochs = self.epochs() if self.budget is not None else {}
        return [{"name": n, "size": float(s), "share": float(w), "units": units.get(n), "epochs": epochs.get(n)}
                for n, s, w in zip(self.names, self.sizes, self.weights)]

    def to_dict(self) -> dict:
        """Plain JSON/YAML-able data to save with the run."""
        return {"budget": self.budget, "leftover": self.leftover, "sources": self.table()}


def _check_sizes(sizes: Mapping[str, float], need_data: bool) -> None:
    if not sizes:
        raise ClpError("the mixture has no sources")
    for name, size in sizes.items():
        if not size >= 0:
            raise ClpError(f"language {name} has a negative or invalid data size ({size})")
        if need_data and size == 0:
            raise ClpError(f"language {name} has no data")


def _check_budget(budget: float | None) -> None:
    if budget is not None and not budget > 0:
        raise ClpError(f"the mixture budget must be positive (found {budget})")


def _normalized(sizes: Mapping[str, float], raw: Mapping[str, float], budget: float | None,
                leftover: float = 0.0) -> Mixture:
    """A Mixture over `sizes`' names (in their order) with weights proportional to `raw`."""
    total = sum(raw.values())
    if not total > 0:
        raise ClpError(f"all mixture weights are zero (sources: {', '.join(sizes)})")
    names = tuple(sizes)
    return Mixture(names, tuple(float(sizes[n]) for n in names), tuple(raw[n] / total for n in names),
                   None if budget is None else float(budget), float(leftover))


def explicit_mixture(sizes: Mapping[str, float], weights: Mapping[str, float], budget: float | None = None) -> Mixture:
    """Given weights per source, normalized to sum to 1; every source needs a weight (0 leaves it out)."""
    _check_sizes(sizes, need_data=False)
    _check_budget(budget)
    unknown = [n for n in weights if n not in sizes]
    if unknown:
        raise ClpError(f"mixture weights name unknown sources: {', '.join(unknown)} (known: {', '.join(sizes)})")
    missing = [n for n in sizes if n not in weights]
    if missing:
        raise ClpError(f"mixture weights missing for: {', '.join(missing)} (give 0 to leave a source out)")
    for name in sizes:
        if not weights[name] >= 0:
            raise ClpError(f"mixture weight of {name} must be >= 0 (found {weights[name]})")
        if weights[name] > 0 and sizes[name] == 0:
            raise ClpError(f"language {name} has no data (its mixture weight is {weights[name]})")
    return _normalized(sizes, weights, budget)


def temperature_mixture(sizes: Mapping[str, float], alpha: float, budget: float | None = None) -> Mixture:
    """Temperature sampling: p_l proportional to n_l^alpha, alpha = 1/T (1: proportional, 0: uniform)."""
    if not 0 <= alpha <= 1:
        raise ClpError(f"temperature sampling alpha must be between 0 and 1 (found {alpha})")
    _check_sizes(sizes, need_data=True)
    _check_budget(budget)
    largest = max(sizes.values())
    return _normalized(sizes, {n: (s / largest) ** alpha for n, s in sizes.items()}, budget)


def _unimax(sizes: Mapping[str, float], budget: float, max_epochs: float) -> tuple[dict[str, float], float]:
    """UniMax allocations in `sizes`' order, and the budget left because every source hit its cap."""
    _check_sizes(sizes, need_data=True)
    _check_budget(budget)
    if not max_epochs > 0:
        raise ClpError(f"UniMax max_epochs must be positive (found {max_epochs})")
    order = sorted(sizes, key=lambda n: (sizes[n], n))
    remaining, allocated = float(budget), {}
    for i, name in enumerate(order):
        allocated[name] = min(remaining / (len(order) - i), float(sizes[name]) * max_epochs)
        remaining -= allocated[name]
    return {n: allocated[n] for n in sizes}, remaining


def unimax_mixture(sizes: Mapping[str, float], budget: float, max_epochs: float) -> Mixture:
    """UniMax (Chung et al. 2023, Algorithm 1): uniform budget per language, capped at `max_epochs` passes.

    Languages go smallest first, each taking min(remaining / languages left, size * max_epochs). If the budget
    exceeds sum(size * max_epochs), every language is capped and what is not drawn is the `leftover`.
    """
    allocated, leftover = _unimax(sizes, budget, max_epochs)
    return _normalized(sizes, allocated, budget - leftover, leftover)


def _select(key: str, available: Mapping[str, float], source_languages: Mapping[str, str]) -> list[str]:
    """The sources a mixture key names: the source of that name, else every source in that language."""
    if key in available:
        return [key]
    chosen = [name for name in available if source_languages.get(name) == key]
    if chosen:
        return chosen
    if not source_languages:
        raise ClpError(f"language {key} has no data (known: {', '.join(available)})")
    raise ClpError(f"language {key} has no data: no source is in language {key!r} or named {key!r} (languages: "
                   f"{', '.join(sorted(set(source_languages.values())))}; sources: {', '.join(available)})")


def _label(name: str, source_languages: Mapping[str, str]) -> str:
    return f"source {name} ({source_languages[name]})" if name in source_languages else f"language {name}"


def fixed_english_plus_n(available: Mapping[str, float], *, english: str = "en", english_budget: int,
                         per_language: int, languages: Sequence[str],
                         source_languages: Mapping[str, str] | None = None) -> dict[str, int]:
    """Examples per key of `available`: `english_budget` for English, `per_language` for each listed language.

    Without `source_languages` the keys are languages. With it (source name -> language) they are sources, and
    `english` or a listed language selects the source of that name, else every source in that language (each
    gets the whole count: with one source per task and language, the budget is per task).
    """
    if english_budget < 0 or per_language < 0:
        raise ClpError(f"english_budget and per_language must be >= 0 (found {english_budget}, {per_language})")
    for i, lang in enumerate(languages):
        if lang == english:
            raise ClpError(f"language {lang} is English, which has its own budget: remove it from 'languages'")
        if lang in languages[:i]:
            raise ClpError(f"language {lang} is listed twice in 'languages'")
    langs = source_languages or {}
    counts: dict[str, int] = {}
    for key, wanted in [(english, english_budget), *((lang, per_language) for lang in languages)]:
        for name in _select(key, available, langs):
            if name in counts:
                raise ClpError(f"source {name} is selected twice ('{key}' and an earlier entry): list it once")
            counts[name] = wanted
    for name, wanted in counts.items():
        have = available[name]
        if wanted > 0 and have == 0:
            raise ClpError(f"{_label(name, langs)} has no data")
        if wanted > have:
            raise ClpError(f"{_label(name, langs)} has only {have:.0f} examples, fewer than the {wanted} asked for")
    return counts


def posttrain_mixture(available: Mapping[str, float], *, english: str = "en", english_budget: int,
                      per_language: int, languages: Sequence[str],
                      source_languages: Mapping[str, str] | None = None) -> Mixture:
    """The fixed-English-plus-N design as a Mixture (over the selected keys of `available`): weights
    proportional to counts, budget their total."""
    counts = fixed_english_plus_n(available, english=english, english_budget=english_budget,
                                  per_language=per_language, languages=languages, source_languages=source_languages)
    sizes = {name: float(available[name]) for name in counts}
    return _normalized(sizes, counts, sum(counts.values()))


class MixtureConfig(ConfigModel):
    """A mixture in a run config; which settings apply depends on `kind`."""

    kind: Literal["explicit", "temperature", "unimax", "english_plus_n"]
    weights: dict[str, float] = Field(default_factory=dict)
    alpha: float = 0.3
    max_epochs: float = 4.0
    budget: float | None = None
    english: str = "en"
    english_budget: int = 0
    per_language: int = 0
    languages: list[str] = Field(default_factory=list)


_USES = {"explicit": ("weights", "budget"), "temperature": ("alpha", "budget"), "unimax": ("budget", "max_epochs"),
         "english_plus_n": ("english", "english_budget", "per_language", "languages")}


def build_mixture(cfg: MixtureConfig, sizes: Mapping[str, float],
                  source_languages: Mapping[str, str] | None = None) -> Mixture:
    """The Mixture a config section describes, over sources of the given sizes (tokens, characters or examples);
    `source_languages` (source name -> language) lets `english_plus_n` select sources by language."""
    for name, field in MixtureConfig.model_fields.items():
        if name != "kind" and name not in _USES[cfg.kind] and getattr(cfg, name) != field.get_default(
                call_default_factory=True):
            raise ClpError(f"mixture kind '{cfg.kind}' does not use '{name}' (it uses: {', '.join(_USES[cfg.kind])})")
    if cfg.kind == "explicit":
        if not cfg.weights:
            raise ClpError("mixture kind 'explicit' needs 'weights' (source: weight)")
        return explicit_mixture(sizes, cfg.weights, cfg.budget)
    if cfg.kind == "temperature":
        return temperature_mixture(sizes, cfg.alpha, cfg.budget)
    if cfg.kind == "unimax":
        if cfg.budget is None:
            raise ClpError("mixture kind 'unimax' needs 'budget' (total units to draw)")
        return unimax_mixture(sizes, cfg.budget, cfg.max_epochs)
    if not cfg.languages:
        raise ClpError("mixture kind 'english_plus_n' needs 'languages' (the non-English languages)")
    if cfg.per_language <= 0:
        raise ClpError("mixture kind 'english_plus_n' needs 'per_language' > 0 (examples per language)")
    return posttrain_mixture(sizes, english=cfg.english, english_budget=cfg.english_budget,
                             per_language=cfg.per_language, languages=cfg.languages, source_languages=source_languages)
