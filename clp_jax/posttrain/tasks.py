"""Post-training tasks that work offline: generated math word problems, demo-corpus dialogues, one-line
descriptions of Wikipedia summaries (`clp-jax fetch wiki-xx`), and any Aya-format JSONL file (`inputs`,
`targets`, `language`), e.g. XLSum, MGSM translations or Aya itself.

Every example is `{"inputs", "targets", "language", "task"}` (math adds `meta`: operation, operands, answer);
`write_jsonl` turns a list of them into a source for the data pipeline (`SourceConfig(format="jsonl", task=...)`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml
from num2words import num2words

from clp_jax.data.demo_corpus import LANGUAGES as DIALOGUE_LANGUAGES
from clp_jax.data.sources import LM_TASK, SourceConfig, read_source
from clp_jax.errors import ClpError
from clp_jax.fetch import default_cache_dir
from clp_jax.files import atomic_open

MATH_TASK = "math"
DIALOGUE_TASK = "dialogue"
SUMMARIZATION_TASK = "summarization"
NUMBER_STYLES = ("digits", "words", "mixed")
OPERATIONS = ("add", "sub", "mul", "two_step")
EXAMPLE_KEYS = ("inputs", "targets", "language", "task")

# Per language: six names and six objects (same count everywhere, so a seed gives parallel problems), one
# template per operation and the closing answer sentence. Extra fields ({q}, {pron}, {gen}, ...) carry
# agreement: interrogatives by the object's gender, pronouns by the name's, Turkish possessive suffixes.
# Operands stay in 2..20 so that written-out numbers never need gender ("un/une", "dois/duas").
_MATH: dict[str, dict] = {
    "en": {"names": [{"name": n} for n in ("Anna", "Tom", "Maria", "James", "Lena", "Omar")],
           "objects": [{"obj": o} for o in ("apples", "books", "pencils", "cookies", "marbles", "stickers")],
           "add": "{name} has {a} {obj} and buys {b} more. How many {obj} does {name} have now?",
           "sub": "{name} has {a} {obj} and gives {b} of them to a friend. How many {obj} does {name} have left?",
           "mul": "{name} buys {a} boxes with {b} {obj} in each box. How many {obj} does {name} buy in total?",
           "two_step": "{name} has {a} {obj}, buys {b} more and then gives {c} away. "
                       "How many {obj} does {name} have now?",
           "answer": "The answer is {x}."},
    "de": {"names": [{"name": n} for n in ("Anna", "Lukas", "Mia", "Felix", "Lena", "Jonas")],
           "objects": [{"obj": o} for o in ("Äpfel", "Bücher", "Stifte", "Kekse", "Murmeln", "Aufkleber")],
           "add": "{name} hat {a} {obj} und kauft {b} dazu. Wie viele {obj} hat {name} jetzt?",
           "sub": "{name} hat {a} {obj} und gibt einem Freund {b} davon. Wie viele {obj} hat {name} noch?",
           "mul": "{name} kauft {a} Schachteln, in jeder sind {b} {obj}. Wie viele {obj} kauft {name} insgesamt?",
           "two_step": "{name} hat {a} {obj}, kauft {b} dazu und verschenkt dann {c}. "
                       "Wie viele {obj} hat {name} jetzt?",
           "answer": "Die Antwort ist {x}."},
    "es": {"names": [{"name": n} for n in ("Ana", "Carlos", "Lucía", "Diego", "Sofía", "Pablo")],
           "objects": [{"obj": o, "q": q} for o, q in (("manzanas", "Cuántas"), ("libros", "Cuántos"),
                                                       ("lápices", "Cuántos"), ("galletas", "Cuántas"),
                                                       ("canicas", "Cuántas"), ("globos", "Cuántos"))],
           "add": "{name} tiene {a} {obj} y compra {b} más. ¿{q} {obj} tiene {name} ahora?",
           "sub": "{name} tiene {a} {obj} y le regala {b} a un amigo. ¿{q} {obj} le quedan a {name}?",
           "mul": "{name} compra {a} cajas con {b} {obj} cada una. ¿{q} {obj} compra {name} en total?",
           "two_step": "{name} tiene {a} {obj}, compra {b} más y luego regala {c}. ¿{q} {obj} tiene {name} ahora?",
           "answer": "La respuesta es {x}."},
    "fr": {"names": [{"name": n, "pron": p} for n, p in (("Marie", "elle"), ("Lucas", "il"), ("Chloé", "elle"),
                                                         ("Hugo", "il"), ("Léa", "elle"), ("Louis", "il"))],
           "objects": [{"obj": o} for o in ("pommes", "livres", "crayons", "biscuits", "billes", "ballons")],
           "add": "{name} a {a} {obj} et en achète {b} de plus. Combien de {obj} {name} a-t-{pron} maintenant ?",
           "sub": "{name} a {a} {obj} et en donne {b} à un ami. Combien de {obj} reste-t-il à {name} ?",
           "mul": "{name} achète {a} boîtes de {b} {obj}. Combien de {obj} {name} achète-t-{pron} en tout ?",
           "two_step": "{name} a {a} {obj}, en achète {b} de plus, puis en donne {c}. "
                       "Combien de {obj} {name} a-t-{pron} maintenant ?",
           "answer": "La réponse est {x}."},
    "it": {"names": [{"name": n} for n in ("Giulia", "Marco", "Sofia", "Luca", "Chiara", "Matteo")],
           "objects": [{"obj": o, "q": "Quant" + e, "altri": "altr" + e}
                       for o, e in (("mele", "e"), ("libri", "i"), ("matite", "e"), ("biscotti", "i"),
                                    ("biglie", "e"), ("palloncini", "i"))],
           "add": "{name} ha {a} {obj} e ne compra {altri} {b}. {q} {obj} ha {name} adesso?",
           "sub": "{name} ha {a} {obj} e ne regala {b} a un amico. {q} {obj} restano a {name}?",
           "mul": "{name} compra {a} scatole con {b} {obj} ciascuna. {q} {obj} compra {name} in tutto?",
           "two_step": "{name} ha {a} {obj}, ne compra {altri} {b} e poi ne regala {c}. {q} {obj} ha {name} adesso?",
           "answer": "La risposta è {x}."},
    "pt": {"names": [{"name": n} for n in ("Ana", "João", "Beatriz", "Pedro", "Inês", "Tiago")],
           "objects": [{"obj": o} for o in ("livros", "lápis", "biscoitos", "balões", "cadernos", "carrinhos")],
           "add": "{name} tem {a} {obj} e compra mais {b}. Quantos {obj} tem {name} agora?",
           "sub": "{name} tem {a} {obj} e dá {b} a um amigo. Com quantos {obj} fica {name}?",
           "mul": "{name} compra {a} pacotes com {b} {obj} cada um. Quantos {obj} compra {name} no total?",
           "two_step": "{name} tem {a} {obj}, compra mais {b} e depois oferece {c}. Quantos {obj} tem {name} agora?",
           "answer": "A resposta é {x}."},
    "nl": {"names": [{"name": n} for n in ("Emma", "Daan", "Sanne", "Luuk", "Julia", "Sem")],
           "objects": [{"obj": o} for o in ("appels", "boeken", "potloden", "koekjes", "knikkers", "ballonnen")],
           "add": "{name} heeft {a} {obj} en koopt er {b} bij. Hoeveel {obj} heeft {name} nu?",
           "sub": "{name} heeft {a} {obj} en geeft er {b} aan een vriend. Hoeveel {obj} heeft {name} nog over?",
           "mul": "{name} koopt {a} dozen met elk {b} {obj}. Hoeveel {obj} koopt {name} in totaal?",
           "two_step": "{name} heeft {a} {obj}, koopt er {b} bij en geeft er daarna {c} weg. "
                       "Hoeveel {obj} heeft {name} nu?",
           "answer": "Het antwoord is {x}."},
    "sv": {"names": [{"name": n} for n in ("Elsa", "Erik", "Maja", "Oskar", "Alva", "Hugo")],
           "objects": [{"obj": o} for o in ("äpplen", "böcker", "pennor", "kakor", "kulor", "ballonger")],
           "add": "{name} har {a} {obj} och köper {b} till. Hur många {obj} har {name} nu?",
           "sub": "{name} har {a} {obj} och ger {b} till en vän. Hur många {obj} har {name} kvar?",
           "mul": "{name} köper {a} lådor med {b} {obj} i varje. Hur många {obj} köper {name} totalt?",
           "two_step": "{name} har {a} {obj}, köper {b} till och ger sedan bort {c}. Hur många {obj} har {name} nu?",
           "answer": "Svaret är {x}."},
    "tr": {"names": [{"name": n, "gen": f"{n}'{s}"} for n, s in (("Ayşe", "nin"), ("Mehmet", "in"),
                                                                 ("Zeynep", "in"), ("Ali", "nin"),
                                                                 ("Elif", "in"), ("Can", "ın"))],
           "objects": [{"obj": o, "poss": p} for o, p in (("elma", "elması"), ("kalem", "kalemi"), ("kitap", "kitabı"),
                                                          ("kurabiye", "kurabiyesi"), ("balon", "balonu"),
                                                          ("bilye", "bilyesi"))],
           "add": "{gen} {a} {poss} var. Sonra {b} {obj} daha satın alıyor. Şimdi {gen} kaç {poss} var?",
           "sub": "{gen} {a} {poss} var. Bir arkadaşına {b} {obj} veriyor. {gen} kaç {poss} kaldı?",
           "mul": "{name} her birinde {b} {obj} olan {a} kutu satın alıyor. {name} toplam kaç {obj} satın alıyor?",
           "two_step": "{gen} {a} {poss} var. Sonra {b} {obj} daha satın alıyor ve {c} {obj} hediye ediyor. "
                       "Şimdi {gen} kaç {poss} var?",
           "answer": "Cevap {x}."},
    "id": {"names": [{"name": n} for n in ("Budi", "Siti", "Andi", "Dewi", "Rina", "Agus")],
           "objects": [{"obj": o} for o in ("apel", "buku", "pensil", "kue", "kelereng", "balon")],
           "add": "{name} punya {a} {obj} dan membeli {b} lagi. Berapa {obj} yang dimiliki {name} sekarang?",
           "sub": "{name} punya {a} {obj} dan memberikan {b} kepada seorang teman. "
                  "Berapa {obj} yang masih dimiliki {name}?",
           "mul": "{name} membeli {a} kotak, masing-masing berisi {b} {obj}. "
                  "Berapa {obj} yang dibeli {name} seluruhnya?",
           "two_step": "{name} punya {a} {obj}, membeli {b} lagi, lalu memberikan {c}. "
                       "Berapa {obj} yang dimiliki {name} sekarang?",
           "answer": "Jawabannya adalah {x}."},
}
LANGUAGES_MATH = list(_MATH)
_CHOICES = 6  # names and objects per language


def _operands(operation: str, rng: random.Random) -> tuple[int, ...]:
    if operation == "add":
        return rng.randint(2, 20), rng.randint(2, 20)
    if operation == "sub":
        a = rng.randint(5, 20)
        return a, rng.randint(2, a - 1)
    if operation == "mul":
        return rng.randint(2, 9), rng.randint(2, 12)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    return a, b, rng.randint(2, a + b - 1)


def _solve(operation: str, operands: tuple[int, ...]) -> tuple[int, str]:
    """(answer, worked steps in digits) of one problem."""
    a, b = operands[:2]
    if operation == "add":
        return a + b, f"{a} + {b} = {a + b}."
    if operation == "sub":
        return a - b, f"{a} - {b} = {a - b}."
    if operation == "mul":
        return a * b, f"{a} × {b} = {a * b}."
    c = operands[2]
    return a + b - c, f"{a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}."


def _number_words(value: int, language: str) -> str:
    """`value` written out by num2words; Turkish teens spaced as the TDK spells them ("on dört", not "ondört")."""
    words = num2words(value, lang=language)
    return "on " + words[2:] if language == "tr" and 10 < value < 20 else words


def math_problems(language: str, n: int, seed: int = 0, numbers: str = "digits") -> list[dict]:
    """`n` distinct arithmetic word problems (add, subtract, multiply, two steps); targets end in the answer.

    Operands are digits, words (num2words in `language`) or, with "mixed", either per problem. A seed gives
    the same operations, operands, name and object slots in every language, so sets are parallel.
    """
    if language not in _MATH:
        raise ClpError(f"math problems have no language {language!r} (available: {', '.join(LANGUAGES_MATH)})")
    if numbers not in NUMBER_STYLES:
        raise ClpError(f"numbers must be one of {', '.join(NUMBER_STYLES)} (found {numbers!r})")
    if n < 0:
        raise ClpError(f"the number of math problems must be >= 0 (found {n})")
    spec, rng = _MATH[language], random.Random(seed)
    seen: set[tuple] = set()
    examples: list[dict] = []
    for _ in range(100 * n + 1000):
        if len(examples) == n:
            break
        operation = rng.choice(OPERATIONS)
        operands = _operands(operation, rng)
        name, obj = rng.randrange(_CHOICES), rng.randrange(_CHOICES)
        style = rng.choice(("digits", "words")) if numbers == "mixed" else numbers
        key = (operation, operands, name, obj, style)
        if key in seen:
            continue
        seen.add(key)
        written = [str(v) if style == "digits" else _number_words(v, language) for v in operands]
        question = spec[operation].format(**spec["names"][name], **spec["objects"][obj],
                                          **dict(zip("abc", written)))
        answer, steps = _solve(operation, operands)
        examples.append({"inputs": question, "targets": f"{steps} {spec['answer'].format(x=answer)}",
                         "language": language, "task": MATH_TASK,
                         "meta": {"operation": operation, "operands": list(operands), "answer": answer,
                                  "numbers": style}})
    if len(examples) < n:
        raise ClpError(f"could only make {len(examples)} distinct math problems in {language}, not {n}")
    return examples


def conversations(language: str) -> list[list[str]]:
    """The demo corpus's conversations in one language (ISO code), in file order, whitespace-normalized.

    A turn that YAML did not read as a string (e.g. a bare 'yes' read as True) is dropped together with the
    pairs around it: the conversation is split there.
    """
    if language not in DIALOGUE_LANGUAGES:
        raise ClpError(f"the demo corpus has no language {language!r} "
                       f"(available: {', '.join(sorted(DIALOGUE_LANGUAGES))})")
    try:
        root = importlib.resources.files("chatterbot_corpus") / "data" / DIALOGUE_LANGUAGES[language]
    except ModuleNotFoundError:
        raise ClpError("dialogue pairs need the chatterbot-corpus package (pip install -r requirements.txt)") from None
    result: list[list[str]] = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith((".yml", ".yaml")):
            continue
        data = yaml.safe_load(entry.read_text(encoding="utf-8")) or {}
        for conversation in data.get("conversations", []):
            turns: list[str] = []
            for turn in [*conversation, None]:
                if isinstance(turn, str) and turn.strip():
                    turns.append(" ".join(turn.split()))
                else:
                    if len(turns) > 1:
                        result.append(turns)
                    turns = []
    return result


def dialogue_pairs(language: str, n: int | None = None, seed: int = 0) -> list[dict]:
    """(utterance, reply) pairs of consecutive turns in the demo corpus, deduplicated: all in corpus order,
    or `n` of them drawn with `seed`."""
    pairs = list(dict.fromkeys((turns[i], turns[i + 1]) for turns in conversations(language)
                               for i in range(len(turns) - 1)))
    if n is not None:
        if not 0 <= n <= len(pairs):
            raise ClpError(f"the demo corpus has {len(pairs)} dialogue pairs in {language}; cannot draw {n}")
        pairs = random.Random(seed).sample(pairs, n)
    return [{"inputs": u, "targets": r, "language": language, "task": DIALOGUE_TASK} for u, r in pairs]


def load_jsonl_task(path: str | os.PathLike, task: str, language: str | None = None) -> list[dict]:
    """Examples of an Aya-format JSONL file (or folder, or glob): `inputs`, `targets` and `language` per line.

    With `language`, records of other languages are skipped (records without the field get it). Bad lines
    are a ClpError naming file:line; empty records are skipped.
    """
    if task == LM_TASK:
        raise ClpError(f"{path}: task '{LM_TASK}' is plain text, not prompt/response pairs; name the task "
                       "(e.g. 'summarization', 'math')")
    source = SourceConfig(name=Path(path).name or str(path), path=str(path), format="jsonl", task=task,
                          language=language)
    return [{"inputs": d.inputs, "targets": d.targets, "language": d.language, "task": d.task}
            for d in read_source(source).documents]


def write_jsonl(examples: Sequence[dict], path: str | os.PathLike) -> None:
    """Write examples as JSON lines (UTF-8, one object each), atomically: a temp file, then `os.replace`."""
    for i, example in enumerate(examples):
        bad = [k for k in EXAMPLE_KEYS if not isinstance(example.get(k), str)]
        if bad:
            raise ClpError(f"{path}: example {i} needs string fields {', '.join(bad)} before it can be written")
    with atomic_open(path) as f:
        for example in examples:
            f.write(json.dumps(example, ensure_ascii=False) + "\n")


# One instruction per language, after the text so that cutting a long prompt from the left keeps it.
_DESCRIBE = {"en": "{text}\n\nDescribe {title} in a few words.",
             "fr": "{text}\n\nDécris {title} en quelques mots.",
             "es": "{text}\n\nDescribe {title} en pocas palabras."}
LANGUAGES_SUMMARIZATION = list(_DESCRIBE)
EVAL_SHARE = 10  # one article in EVAL_SHARE is held out for evaluation
MIN_TEXT_WORDS = 10


def wiki_summaries_path(language: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where `clp-jax fetch wiki-<language>` puts its summaries: `<cache>/wiki-xx/text/xx.jsonl`."""
    return Path(cache_dir or default_cache_dir()) / f"wiki-{language}" / "text" / f"{language}.jsonl"


def wiki_articles(language: str, cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """The fetched summaries of one language that have a description and a text of >= MIN_TEXT_WORDS words,
    one per distinct text, in file order."""
    if language not in _DESCRIBE:
        raise ClpError(f"summarization has no language {language!r} (available: {', '.join(_DESCRIBE)})")
    path = wiki_summaries_path(language, cache_dir)
    if not path.is_file():
        raise ClpError(f"summarization in {language!r} needs the dataset wiki-{language}, not found at {path}: "
                       f"run `clp-jax fetch wiki-{language}` (or point a study's fetch_cache at the cache holding it)")
    articles: dict[str, dict] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                key, title, text, description = (str(record[k]).strip() for k in ("key", "title", "text",
                                                                                   "description"))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ClpError(f"{path}:{number}: not a summary record with key, title, text and description "
                               f"({e})") from None
            if description and description != text and len(text.split()) >= MIN_TEXT_WORDS:
                articles.setdefault(text, {"key": key, "title": title, "text": text, "description": description})
    return list(articles.values())


def article_split(key: str) -> str:
    """"eval" for one article key in EVAL_SHARE (by its sha256), else "train": fixed, whatever the seed."""
    return "eval" if int(hashlib.sha256(key.encode()).hexdigest(), 16) % EVAL_SHARE == 0 else "train"


def wiki_descriptions(language: str, n: int, seed: int = 0, split: str = "train",
                      cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """`n` articles of one split drawn with `seed`: the summary and title in, the one-line description out.

    The description is Wikidata's short description of the article, so the target is a real summary of a few
    words. Splits are by article key (`article_split`), so no article is in both.
    """
    if split not in ("train", "eval"):
        raise ClpError(f"split must be 'train' or 'eval' (found {split!r})")
    pool = [a for a in wiki_articles(language, cache_dir) if article_split(a["key"]) == split]
    if not 0 <= n <= len(pool):
        raise ClpError(f"wiki-{language} has {len(pool)} {split} articles with a description; cannot draw {n}")
    return [{"inputs": _DESCRIBE[language].format(text=a["text"], title=a["title"]), "targets": a["description"],
             "language": language, "task": SUMMARIZATION_TASK} for a in random.Random(seed).sample(pool, n)]


EVAL_SEED_OFFSET = 10_000  # generated tasks draw eval examples with seed + this (train ones equal to them are dropped)


@dataclasses.dataclass(frozen=True)
class BuiltinTask:
    """An offline task a study can name: how it is scored, which languages it covers and its examples."""

    kind: str
    languages: tuple[str, ...]
    make: Callable[[str, int, int, str, str | None], list[dict]]  # (language, n, seed, split, fetch cache)

    def examples(self, language: str, n: int, seed: int = 0, split: str = "train",
                 cache_dir: str | None = None) -> list[dict]:
        """`n` examples of one language and split ("train" or "eval")."""
        if language not in self.languages:
            raise ClpError(f"task kind {self.kind!r} has no language {language!r} "
                           f"(available: {', '.join(self.languages)})")
        return self.make(language, n, seed, split, cache_dir)


def _by_seed(generate: Callable[[str, int, int], list[dict]]) -> Callable[[str, int, int, str, str | None], list]:
    """A generator whose eval split is drawn with another seed."""
    return lambda language, n, seed, split, _: generate(language, n, seed + (EVAL_SEED_OFFSET if split == "eval"
                                                                                else 0))


# Built-in offline tasks by name. JSONL tasks come through `load_jsonl_task`.
TASKS: dict[str, BuiltinTask] = {
    MATH_TASK: BuiltinTask("math", tuple(LANGUAGES_MATH), _by_seed(math_problems)),
    DIALOGUE_TASK: BuiltinTask("dialogue", tuple(DIALOGUE_LANGUAGES), _by_seed(dialogue_pairs)),
    SUMMARIZATION_TASK: BuiltinTask("summarization", tuple(LANGUAGES_SUMMARIZATION), wiki_descriptions),
}
