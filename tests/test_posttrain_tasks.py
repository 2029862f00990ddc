"""Offline post-training tasks: math word problems, demo-corpus dialogue pairs, Wikipedia descriptions,
Aya-format JSONL in and out."""

import hashlib
import json
import re

import pytest
from num2words import num2words
from wiki_cache import TEXT, write_wiki_cache

from clp_jax.data.sources import SourceConfig, read_source
from clp_jax.errors import ClpError
from clp_jax.eval.metrics import exact_match, extract_final_number
from clp_jax.posttrain.tasks import (
    LANGUAGES_MATH,
    OPERATIONS,
    TASKS,
    article_split,
    dialogue_pairs,
    load_jsonl_task,
    math_problems,
    wiki_articles,
    wiki_descriptions,
    wiki_summaries_path,
    write_jsonl,
)

ANSWER = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
          "two_step": lambda a, b, c: a + b - c}


def strip_meta(examples):
    return [{k: v for k, v in ex.items() if k != "meta"} for ex in examples]


def test_math_covers_at_least_eight_languages():
    assert len(LANGUAGES_MATH) >= 8 and {"en", "de", "es", "fr"} <= set(LANGUAGES_MATH)


@pytest.mark.parametrize("language", LANGUAGES_MATH)
def test_math_problems_are_correct_and_distinct(language):
    examples = math_problems(language, 60, seed=0)
    assert len(examples) == 60
    assert len({ex["inputs"] for ex in examples}) == 60
    assert {ex["meta"]["operation"] for ex in examples} == set(OPERATIONS)
    for ex in examples:
        assert ex["language"] == language and ex["task"] == "math"
        meta = ex["meta"]
        answer = ANSWER[meta["operation"]](*meta["operands"])
        assert answer == meta["answer"] and answer > 0
        # The question states exactly the operands, and the target ends in the answer, in digits.
        assert sorted(int(x) for x in re.findall(r"\d+", ex["inputs"])) == sorted(meta["operands"])
        assert ex["targets"].rstrip(".").endswith(str(answer))
        assert extract_final_number(ex["targets"]) == str(answer)
        assert exact_match(f"... so the answer is {answer}", ex["targets"]) == 1.0


@pytest.mark.parametrize("language", LANGUAGES_MATH)
def test_math_numbers_as_words_have_no_digits_in_the_question(language):
    for ex in math_problems(language, 30, seed=1, numbers="words"):
        assert not any(ch.isdigit() for ch in ex["inputs"]), ex["inputs"]
        assert extract_final_number(ex["targets"]) == str(ex["meta"]["answer"])


def test_math_words_are_num2words_in_the_language():
    for ex in math_problems("en", 20, seed=2, numbers="words"):
        for operand in ex["meta"]["operands"]:
            assert re.search(rf"\b{num2words(operand, lang='en')}\b", ex["inputs"]), ex["inputs"]
    example = math_problems("de", 1, seed=5, numbers="words")[0]
    assert all(num2words(v, lang="de") in example["inputs"] for v in example["meta"]["operands"])


def test_math_mixed_uses_both_styles():
    examples = math_problems("fr", 40, seed=0, numbers="mixed")
    assert {ex["meta"]["numbers"] for ex in examples} == {"digits", "words"}
    for ex in examples:
        assert any(ch.isdigit() for ch in ex["inputs"]) == (ex["meta"]["numbers"] == "digits")


def test_math_is_deterministic_and_parallel_across_languages():
    assert math_problems("es", 25, seed=3) == math_problems("es", 25, seed=3)
    assert math_problems("es", 25, seed=3) != math_problems("es", 25, seed=4)
    metas = {lang: [ex["meta"] for ex in math_problems(lang, 25, seed=3)] for lang in ("en", "de", "tr")}
    assert metas["en"] == metas["de"] == metas["tr"]
    assert math_problems("en", 10, seed=3) == math_problems("en", 25, seed=3)[:10]


def test_math_errors():
    with pytest.raises(ClpError, match="no language 'xx'"):
        math_problems("xx", 3)
    with pytest.raises(ClpError, match="numbers must be one of"):
        math_problems("en", 3, numbers="roman")
    assert math_problems("en", 0) == []


@pytest.mark.parametrize("language", ["en", "de"])
def test_dialogue_pairs(language):
    pairs = dialogue_pairs(language)
    assert len(pairs) > 50
    assert len({(p["inputs"], p["targets"]) for p in pairs}) == len(pairs)
    assert all(p["inputs"] and p["targets"] and p["task"] == "dialogue" and p["language"] == language
               for p in pairs)
    drawn = dialogue_pairs(language, n=10, seed=1)
    assert drawn == dialogue_pairs(language, n=10, seed=1) and len(drawn) == 10
    assert all(p in pairs for p in drawn)


def test_dialogue_pairs_are_consecutive_turns():
    pairs = {(p["inputs"], p["targets"]) for p in dialogue_pairs("de")}
    # german/conversations.yml: "Guten Morgen, wie geht es dir?" / "Mir geht es gut und wie geht es dir?" / ...
    assert ("Guten Morgen, wie geht es dir?", "Mir geht es gut und wie geht es dir?") in pairs
    assert ("Mir geht es gut und wie geht es dir?", "Mir geht es auch gut") in pairs


def test_dialogue_errors():
    with pytest.raises(ClpError, match="no language 'xx'"):
        dialogue_pairs("xx")
    with pytest.raises(ClpError, match="cannot draw 100000"):
        dialogue_pairs("de", n=100_000)


def test_tasks_registry():
    assert TASKS["math"].examples("de", 3, 0) == math_problems("de", 3, seed=0)
    assert TASKS["math"].examples("de", 3, 0, split="eval") == math_problems("de", 3, seed=10_000)
    assert len(TASKS["dialogue"].examples("en", 3, 0)) == 3
    assert {name: task.kind for name, task in TASKS.items()} == {"math": "math", "dialogue": "dialogue",
                                                                "summarization": "summarization"}
    assert TASKS["summarization"].languages == ("en", "fr", "es")
    with pytest.raises(ClpError, match="no language 'de'"):
        TASKS["summarization"].examples("de", 3, 0)


def test_wiki_descriptions_split_by_key_disjoint_and_seeded(tmp_path):
    write_wiki_cache(tmp_path, "en", 200)
    eval_keys = {f"en-{i}" for i in range(200) if int(hashlib.sha256(f"en-{i}".encode()).hexdigest(), 16) % 10 == 0}
    train = wiki_descriptions("en", 200 - len(eval_keys), seed=0, split="train", cache_dir=tmp_path)
    held_out = wiki_descriptions("en", len(eval_keys), seed=3, split="eval", cache_dir=tmp_path)
    assert {e["targets"] for e in held_out} == {f"thing {k[3:]} in en" for k in eval_keys}  # the split is sha256
    assert not {e["inputs"] for e in train} & {e["inputs"] for e in held_out}
    assert len(train) + len(held_out) == 200
    first = wiki_descriptions("en", 5, seed=1, cache_dir=tmp_path)
    assert first == wiki_descriptions("en", 5, seed=1, cache_dir=tmp_path)
    assert first != wiki_descriptions("en", 5, seed=2, cache_dir=tmp_path)
    i = first[0]["targets"].split()[1]
    assert first[0]["inputs"] == TEXT.format(i=i, title=f"Thing {i}") + f"\n\nDescribe Thing {i} in a few words."
    assert {k: first[0][k] for k in ("language", "task")} == {"language": "en", "task": "summarization"}


def test_wiki_descriptions_keep_usable_distinct_articles(tmp_path):
    text = TEXT.format(i=0, title="Thing 0")
    extra = [{"key": "nodesc", "title": "A", "description": "", "text": text + " More.", "language": "fr"},
             {"key": "short", "title": "B", "description": "b", "text": "Too short to use.", "language": "fr"},
             {"key": "same", "title": "C", "description": text + " C", "text": text + " C", "language": "fr"},
             {"key": "copy", "title": "D", "description": "d", "text": text, "language": "fr"}]
    write_wiki_cache(tmp_path, "fr", 1, extra)
    assert [a["key"] for a in wiki_articles("fr", tmp_path)] == ["fr-0"]  # "copy" repeats fr-0's text
    (example,) = wiki_descriptions("fr", 1, split=article_split("fr-0"), cache_dir=tmp_path)
    assert example["targets"] == "thing 0 in fr"
    assert example["inputs"] == text + "\n\nDécris Thing 0 en quelques mots."


def test_wiki_descriptions_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("CLP_JAX_CACHE", str(tmp_path / "cache"))
    assert wiki_summaries_path("es") == tmp_path / "cache" / "wiki-es" / "text" / "es.jsonl"
    with pytest.raises(ClpError, match=r"needs the dataset wiki-es.*run `clp-jax fetch wiki-es`"):
        wiki_descriptions("es", 1)
    path = write_wiki_cache(tmp_path / "cache", "es", 30)
    with pytest.raises(ClpError, match="cannot draw 30"):
        wiki_descriptions("es", 30)
    with pytest.raises(ClpError, match="split must be"):
        wiki_descriptions("es", 1, split="test")
    path.write_text(path.read_text() + '{"key": "x"}\n')
    with pytest.raises(ClpError, match=r"es.jsonl:31: not a summary record"):
        wiki_descriptions("es", 1)


def test_jsonl_round_trip(tmp_path):
    examples = math_problems("de", 20, seed=0, numbers="mixed") + math_problems("tr", 5, seed=0)
    path = tmp_path / "out" / "math.jsonl"
    write_jsonl(examples, path)
    assert [p.name for p in path.parent.iterdir()] == ["math.jsonl"]  # no temp file left behind
    assert json.loads(path.read_text(encoding="utf-8").splitlines()[0])["inputs"] == examples[0]["inputs"]
    assert load_jsonl_task(path, "math") == strip_meta(examples)
    assert load_jsonl_task(path, "math", language="tr") == strip_meta(examples[20:])
    # The same file is a pipeline source.
    data = read_source(SourceConfig(name="math", path=str(path), format="jsonl", task="math"))
    assert [(d.inputs, d.targets, d.language) for d in data.documents] == [
        (ex["inputs"], ex["targets"], ex["language"]) for ex in examples]


def test_load_jsonl_task_language_for_records_without_one(tmp_path):
    path = tmp_path / "xlsum.jsonl"
    path.write_text('{"inputs": "Ein langer Text.", "targets": "Kurz."}\n', encoding="utf-8")
    assert load_jsonl_task(path, "summarization", language="de") == [
        {"inputs": "Ein langer Text.", "targets": "Kurz.", "language": "de", "task": "summarization"}]
    with pytest.raises(ClpError, match=rf"{re.escape(str(path))}:1: missing field 'language'"):
        load_jsonl_task(path, "summarization")


def test_load_jsonl_task_errors_name_the_line(tmp_path):
    good = json.dumps({"inputs": "a", "targets": "b", "language": "en"})
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(ClpError, match=rf"{re.escape(str(path))}:3: invalid JSON"):
        load_jsonl_task(path, "open")
    path.write_text(good + "\n" + json.dumps({"inputs": "a", "language": "en"}) + "\n", encoding="utf-8")
    with pytest.raises(ClpError, match=rf"{re.escape(str(path))}:2: missing field 'targets'"):
        load_jsonl_task(path, "open")
    with pytest.raises(ClpError, match="plain text"):
        load_jsonl_task(path, "lm")
    with pytest.raises(ClpError, match="no such file"):
        load_jsonl_task(tmp_path / "missing.jsonl", "open")


def test_write_jsonl_rejects_bad_examples_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "tasks.jsonl"
    write_jsonl(dialogue_pairs("en", n=2, seed=0), path)
    before = path.read_text(encoding="utf-8")
    with pytest.raises(ClpError, match="example 1 needs string fields targets"):
        write_jsonl([{"inputs": "a", "targets": "b", "language": "en", "task": "open"},
                     {"inputs": "a", "targets": 3, "language": "en", "task": "open"}], path)
    assert path.read_text(encoding="utf-8") == before
    assert [p.name for p in tmp_path.iterdir()] == ["tasks.jsonl"]
