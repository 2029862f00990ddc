"""A tiny stand-in for `clp-jax fetch wiki-xx`: summary records in `<root>/wiki-xx/text/xx.jsonl`."""

import json
from pathlib import Path

TEXT = "Article number {i} of this small test set tells a short story about a thing called {title} here."


def write_wiki_cache(root, language, n, extra=()):
    """`n` usable articles (keys `<language>-<i>`) plus the `extra` records, one JSON per line."""
    records = [{"key": f"{language}-{i}", "title": f"Thing {i}", "description": f"thing {i} in {language}",
                "topic": "Test", "text": TEXT.format(i=i, title=f"Thing {i}"), "language": language}
               for i in range(n)]
    path = Path(root) / f"wiki-{language}" / "text" / f"{language}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [*records, *extra]), encoding="utf-8")
    return path
