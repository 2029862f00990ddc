"""Reading sources: every kind of file and location, TFDS offline, undecodable lines, and the errors."""

import gzip
import json

import pydantic
import pytest

from clp_jax.config import load_config
from clp_jax.data.sources import Document, SourceConfig, read_source
from clp_jax.errors import ClpError


def error(fn, *args) -> str:
    with pytest.raises(ClpError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def texts(data) -> list[str]:
    return [d.text for d in data.documents]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_text_one_document_per_line_skips_blank_lines_and_strips(tmp_path):
    path = tmp_path / "de.txt"
    path.write_bytes("\ufeffErster Satz.\r\n\n  Zweiter   Satz. \nDritter über Straße.".encode())
    data = read_source(SourceConfig(name="de", path=str(path), language="de"))
    assert texts(data) == ["Erster Satz.", "Zweiter   Satz.", "Dritter über Straße."]
    assert {(d.language, d.task) for d in data.documents} == {("de", "lm")}
    assert data.stats.documents == 3 and data.stats.files == [str(path)] and data.stats.skipped_undecodable == 0
    assert data.language == "de"


def test_text_one_document_per_file_keeps_paragraphs(tmp_path):
    (tmp_path / "a.txt").write_text("Title\n\nFirst paragraph.\nSecond line.\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("Other file.", encoding="utf-8")
    data = read_source(SourceConfig(name="docs", path=str(tmp_path), language="en", per_line=False))
    assert texts(data) == ["Title\n\nFirst paragraph.\nSecond line.", "Other file."]
    assert len(data.stats.files) == 2


def test_folder_is_read_recursively_in_sorted_order_without_hidden_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("two\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("one\n", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("hidden\n", encoding="utf-8")
    (tmp_path / "c.jsonl").write_text('{"text": "three"}\n', encoding="utf-8")
    data = read_source(SourceConfig(name="mix", path=str(tmp_path), language="en"))
    assert texts(data) == ["one", "two", "three"]  # a.txt, b/2.txt, c.jsonl (format inferred per file)


def test_glob_matches_files_only(tmp_path):
    for name, line in [("x1.txt", "first"), ("x2.txt", "second"), ("y.txt", "other")]:
        (tmp_path / name).write_text(line + "\n", encoding="utf-8")
    data = read_source(SourceConfig(name="x", path=str(tmp_path / "x*.txt"), language="en"))
    assert texts(data) == ["first", "second"]
    assert "no files match" in error(read_source, SourceConfig(name="z", path=str(tmp_path / "z*.txt"),
                                                               language="en"))


def test_gzip_text_and_jsonl_are_read_transparently(tmp_path):
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write("komprimiert eins\nkomprimiert zwei\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write('{"text": "aus json"}\n')
    assert texts(read_source(SourceConfig(name="gz", path=str(tmp_path / "a.txt.gz"), language="de"))) == [
        "komprimiert eins", "komprimiert zwei"]
    assert texts(read_source(SourceConfig(name="gz", path=str(tmp_path / "b.jsonl.gz"), language="de"))) == [
        "aus json"]
    (tmp_path / "broken.txt.gz").write_bytes(gzip.compress(b"some text\n" * 100)[:-12])
    assert "cannot decompress" in error(read_source, SourceConfig(name="b", path=str(tmp_path / "broken.txt.gz"),
                                                                  language="de"))


def test_zstd_file_reads_or_names_the_missing_package(tmp_path):
    path = tmp_path / "a.txt.zst"
    try:
        import zstandard
    except ImportError:
        path.write_bytes(b"\x28\xb5\x2f\xfd" + b"\x00" * 16)
        message = error(read_source, SourceConfig(name="z", path=str(path), language="en"))
        assert str(path) in message and "pip install zstandard" in message
    else:
        path.write_bytes(zstandard.ZstdCompressor().compress(b"zstd line\n"))
        assert texts(read_source(SourceConfig(name="z", path=str(path), language="en"))) == ["zstd line"]


def test_undecodable_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good one\n\xff\xfe broken\nalso good\n\xc3\x28\n")
    data = read_source(SourceConfig(name="bad", path=str(path), language="en"))
    assert texts(data) == ["good one", "also good"]
    assert data.stats.skipped_undecodable == 2
    assert "2 undecodable lines" in data.stats.summary()
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"text": "fine"}\n{"text": "\xff"}\n')
    data = read_source(SourceConfig(name="bad", path=str(jsonl), language="en"))
    assert texts(data) == ["fine"] and data.stats.skipped_undecodable == 1
    only_bad = tmp_path / "only_bad.txt"
    only_bad.write_bytes(b"\xff\xff\n\xfe\n")
    message = error(read_source, SourceConfig(name="only", path=str(only_bad), language="en"))
    assert str(only_bad) in message and "not valid UTF-8" in message


def test_jsonl_text_field_and_per_record_language(tmp_path):
    path = write_jsonl(tmp_path / "wiki.jsonl", [{"body": "Hallo Welt", "lang": "de", "id": 1},
                                                 {"body": "Hello world", "lang": "en", "id": 2},
                                                 {"body": "  ", "lang": "en"}])
    data = read_source(SourceConfig(name="wiki", path=path, text_field="body", language_field="lang"))
    assert [(d.text, d.language) for d in data.documents] == [("Hallo Welt", "de"), ("Hello world", "en")]
    assert data.stats.skipped_empty == 1 and data.language == "mul"
    only_de = read_source(SourceConfig(name="wiki", path=path, text_field="body", language_field="lang",
                                       language="de"))
    assert texts(only_de) == ["Hallo Welt"] and only_de.stats.skipped_language == 2


def test_jsonl_sft_fields_as_in_aya(tmp_path):
    path = write_jsonl(tmp_path / "aya.jsonl", [
        {"inputs": "Was ist die Hauptstadt?", "targets": "Berlin.", "language": "German", "user_id": "x"},
        {"inputs": "What is 2+2?", "targets": "4", "language": "English"}])
    data = read_source(SourceConfig(name="aya", path=path, task="sft"))
    assert data.documents == [Document("German", "sft", inputs="Was ist die Hauptstadt?", targets="Berlin."),
                              Document("English", "sft", inputs="What is 2+2?", targets="4")]
    german = read_source(SourceConfig(name="aya", path=path, task="sft", language="German"))
    assert [d.targets for d in german.documents] == ["Berlin."]
    message = error(read_source, SourceConfig(name="aya", path=path, task="sft", language="Swahili"))
    assert "no documents in language 'Swahili'" in message and "German" in message and path in message


def test_config_comes_from_yaml_and_rejects_bad_locations(tmp_path):
    cfg_path = tmp_path / "src.yaml"
    cfg_path.write_text("name: wiki\npath: /data/wiki/*.jsonl.gz\nlanguage: de\ntext_field: body\n")
    cfg = load_config(SourceConfig, cfg_path)
    assert (cfg.path, cfg.format, cfg.text_field, cfg.task, cfg.pairs) == ("/data/wiki/*.jsonl.gz", "auto", "body",
                                                                            "lm", False)
    with pytest.raises(pydantic.ValidationError, match="exactly one of 'path' or 'tfds'"):
        SourceConfig(name="x", language="en")
    with pytest.raises(pydantic.ValidationError, match="exactly one of 'path' or 'tfds'"):
        SourceConfig(name="x", path="a.txt", tfds="c4", language="en")
    with pytest.raises(pydantic.ValidationError, match="needs a 'language'"):
        SourceConfig(name="x", path="a.txt", format="text")
    with pytest.raises(ClpError, match="typo"):
        cfg_path.write_text("name: wiki\npath: a.txt\nlanguage: de\ntypo: 1\n")
        load_config(SourceConfig, cfg_path)


def test_missing_and_empty_inputs_name_the_file(tmp_path):
    missing = tmp_path / "nope.txt"
    assert error(read_source, SourceConfig(name="m", path=str(missing), language="en")) == (
        f"{missing}: no such file or folder")
    (tmp_path / "empty_dir").mkdir()
    assert "folder has no files" in error(read_source, SourceConfig(name="m", path=str(tmp_path / "empty_dir"),
                                                                    language="en"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    assert error(read_source, SourceConfig(name="e", path=str(empty), language="en")) == (
        f"{empty}: file is empty (no non-blank lines)")
    plain = tmp_path / "plain.txt"
    plain.write_text("text\n", encoding="utf-8")
    assert "set 'language'" in error(read_source, SourceConfig(name="p", path=str(plain)))
    assert "needs prompt/response records" in error(read_source, SourceConfig(name="p", path=str(plain),
                                                                              language="en", task="sft"))


def test_jsonl_errors_name_file_line_and_field(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n\n{"text": "unterminated}\n', encoding="utf-8")
    message = error(read_source, SourceConfig(name="b", path=str(bad_json), language="en"))
    assert message.startswith(f"{bad_json}:3: invalid JSON")
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"text": "ok"}, {"content": "no text"}])
    assert error(read_source, SourceConfig(name="b", path=missing, language="en")) == (
        f"{missing}:2: missing field 'text' (fields: content)")
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"inputs": "q", "language": "en"}])
    assert error(read_source, SourceConfig(name="s", path=sft, task="sft")) == (
        f"{sft}:1: missing field 'targets' (fields: inputs, language)")
    no_lang = write_jsonl(tmp_path / "nolang.jsonl", [{"text": "t"}])
    assert error(read_source, SourceConfig(name="n", path=no_lang)) == (
        f"{no_lang}:1: missing field 'language' (fields: text)")
    wrong_type = write_jsonl(tmp_path / "type.jsonl", [{"text": 3}])
    assert "field 'text' must be a string, found int" in error(
        read_source, SourceConfig(name="t", path=wrong_type, language="en"))
    array = write_jsonl(tmp_path / "array.jsonl", [["a", "b"]])
    assert error(read_source, SourceConfig(name="a", path=array, language="en")) == (
        f"{array}:1: expected a JSON object, found list")


def build_tiny_tfds(data_dir, records):
    """A prepared TFDS dataset in array_record format, built offline and without TensorFlow."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class ClpTinyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict({"text": tfds.features.Text(), "lang": tfds.features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(records[:-1]), "test": self._generate_examples(records[-1:])}

        def _generate_examples(self, rows):
            for i, (text, lang) in enumerate(rows):
                yield i, {"text": text, "lang": lang}

    ClpTinyText(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_tfds_dataset_is_read_from_a_local_data_dir(tmp_path):
    records = [("Erster Text.", "de"), ("First text.", "en"), ("Zweiter Text.", "de"), ("Test split.", "de")]
    build_tiny_tfds(tmp_path, records)
    src = SourceConfig(name="tiny", tfds="clp_tiny_text", data_dir=str(tmp_path), language="de",
                       language_field="lang")
    data = read_source(src)
    assert texts(data) == ["Erster Text.", "Zweiter Text."] and data.stats.skipped_language == 1
    test_split = read_source(src.model_copy(update={"split": "test"}))
    assert texts(test_split) == ["Test split."]
    assert "Unknown split" in error(read_source, src.model_copy(update={"split": "validation"}))
    message = error(read_source, src.model_copy(update={"text_field": "body"}))
    assert "record 0: missing field 'body' (fields: lang, text)" in message and "clp_tiny_text" in message


def test_unknown_tfds_name_is_a_clear_error(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    src = SourceConfig(name="nope", tfds="no_such_dataset_xyz", data_dir=str(tmp_path), language="en")
    message = error(read_source, src)
    assert "TFDS dataset 'no_such_dataset_xyz' not found" in message and str(tmp_path) in message
    registered_but_absent = src.model_copy(update={"tfds": "mnist"})
    message = error(read_source, registered_but_absent)
    assert "TFDS dataset 'mnist' not found" in message and str(tmp_path) in message
