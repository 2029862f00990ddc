"""The demo's real multilingual text: the chatterbot-corpus package (BSD-3-Clause), from PyPI.

Dialogues in about 28 languages, installed with the runtime requirements, never committed. Each
utterance becomes one document (line).
"""

from __future__ import annotations

import importlib.resources

import yaml

from clp_jax.errors import ClpError

LANGUAGES = {"en": "english", "de": "german", "es": "spanish", "fr": "french", "it": "italian", "pt": "portuguese",
             "nl": "dutch", "sv": "swedish", "tr": "turkish", "ru": "russian", "uk": "ukrainian", "id": "indonesian",
             "hi": "hindi", "bn": "bengali", "fa": "persian", "he": "hebrew", "ja": "japanese", "ko": "korean",
             "zh": "chinese", "mr": "marathi", "ta": "tamil", "te": "telugu", "th": "thai", "ur": "urdu",
             "yo": "yoruba"}


def demo_texts(lang: str) -> list[str]:
    """All utterances of one language (ISO code), in file order, deduplicated."""
    if lang not in LANGUAGES:
        raise ClpError(f"demo corpus has no language {lang!r} (available: {', '.join(sorted(LANGUAGES))})")
    try:
        root = importlib.resources.files("chatterbot_corpus") / "data" / LANGUAGES[lang]
    except ModuleNotFoundError:
        raise ClpError("the demo corpus needs the chatterbot-corpus package "
                       "(pip install -r requirements.txt)") from None
    seen: dict[str, None] = {}
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith((".yml", ".yaml")):
            continue
        data = yaml.safe_load(entry.read_text(encoding="utf-8")) or {}
        for conversation in data.get("conversations", []):
            for utterance in conversation:
                if isinstance(utterance, str) and utterance.strip():
                    seen.setdefault(" ".join(utterance.split()), None)
    return list(seen)
