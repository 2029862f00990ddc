"""Parquet files and `datasets` save_to_disk dirs as sources: fields, languages, nulls, splits, laziness, errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
from test_data_sources import error

from clp_jax.data import columnar
from clp_jax.data.sources import Document, SourceConfig, read_source

ROWS = [{"text": "Erster Satz über Straßen.", "language": "de", "id": 0},
        {"text": None, "language": "de", "id": 1},
        {"text": "Première phrase, déjà vue.", "language": "fr", "id": 2},
        {"text": "   ", "language": "de", "id": 3},
        {"text": "日本語の文。", "language": None, "id": 4},
        {"text": "Zweiter Satz.", "language": "de", "id": 5},
        {"text": "Tercera frase.", "language": "es", "id": 6}]


def write_parquet(path, rows, row_group_size=2) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return str(path)


def write_saved_dataset(folder, shards, split="train"):
    """A Dataset dir as `datasets` save_to_disk writes it: Arrow IPC streams plus state.json and dataset_info.json."""
    folder.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))]
    for name, rows in zip(names, shards):
        table = pa.Table.from_pylist(rows)
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=2):
                writer.write_batch(batch)
    features = {key: {"dtype": "string", "_type": "Value"} for key in shards[0][0]}
    (folder / "dataset_info.json").write_text(json.dumps({"citation": "", "description": "", "features": features,
                                                          "homepage": "", "license": ""}, indent=2))
    (folder / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": name} for name in names], "_fingerprint": "0123456789abcdef",
        "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
        "_split": split}, indent=2, sort_keys=True))


def test_parquet_row_groups_non_ascii_per_record_language_and_nulls(tmp_path):
    path = write_parquet(tmp_path / "corpus.parquet", ROWS)
    assert pq.ParquetFile(path).num_row_groups == 4
    data = read_source(SourceConfig(name="web", path=path))
    assert [(d.text, d.language) for d in data.documents] == [
        ("Erster Satz über Straßen.", "de"), ("Première phrase, déjà vue.", "fr"), ("Zweiter Satz.", "de"),
        ("Tercera frase.", "es")]
    assert data.stats.skipped_empty == 3 and data.stats.files == [path]  # null text, blank text, null language
    assert "3 empty records" in data.stats.summary()
    german = read_source(SourceConfig(name="de", path=path, language="de"))
    assert [d.text for d in german.documents] == ["Erster Satz über Straßen.", "日本語の文。", "Zweiter Satz."]
    assert german.stats.skipped_language == 2 and german.stats.skipped_empty == 2


def test_parquet_text_field_dir_glob_and_explicit_format(tmp_path):
    (tmp_path / "shards").mkdir()
    write_parquet(tmp_path / "shards" / "b.parquet", [{"content": "zwei"}])
    write_parquet(tmp_path / "shards" / "a.parquet", [{"content": "eins"}])
    src = SourceConfig(name="cx", path=str(tmp_path / "shards"), text_field="content", language="de")
    assert [d.text for d in read_source(src).documents] == ["eins", "zwei"]
    glob_src = src.model_copy(update={"path": str(tmp_path / "shards" / "*.parquet")})
    assert [d.text for d in read_source(glob_src).documents] == ["eins", "zwei"]
    odd_name = write_parquet(tmp_path / "fineweb.bin", [{"content": "ohne Endung"}])
    explicit = src.model_copy(update={"path": odd_name, "format": "parquet"})
    assert [d.text for d in read_source(explicit).documents] == ["ohne Endung"]


def test_parquet_sft_pairs_as_in_aya(tmp_path):
    path = write_parquet(tmp_path / "aya.parquet", [
        {"inputs": "Was ist die Hauptstadt?", "targets": "Berlin.", "language": "German"},
        {"inputs": "Question vide", "targets": None, "language": "French"},
        {"inputs": "What is 2+2?", "targets": "4", "language": "English"}])
    data = read_source(SourceConfig(name="aya", path=path, task="sft"))
    assert data.documents == [Document("German", "sft", inputs="Was ist die Hauptstadt?", targets="Berlin."),
                              Document("English", "sft", inputs="What is 2+2?", targets="4")]
    assert data.stats.skipped_empty == 1


def test_parquet_is_read_lazily_one_batch_at_a_time(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "big.parquet", [{"text": f"doc {i}"} for i in range(10)])
    read = []
    original = pq.ParquetFile.iter_batches

    def counting(self, *args, **kwargs):
        for batch in original(self, *args, **kwargs):
            read.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    monkeypatch.setattr(columnar, "BATCH_ROWS", 2)
    rows = columnar.read_rows(path, "parquet", ["text"])
    assert next(rows) == {"text": "doc 0"} and read == [2]
    assert [r["text"] for r in rows] == [f"doc {i}" for i in range(1, 10)] and read == [2] * 5
    data = read_source(SourceConfig(name="big", path=path, language="en"))  # the reader sources go through
    assert [d.text for d in data.documents] == [f"doc {i}" for i in range(10)] and read == [2] * 10


def test_saved_dataset_dir_reads_its_arrow_streams_in_order(tmp_path):
    folder = tmp_path / "culturax_de"
    write_saved_dataset(folder, [ROWS[:4], ROWS[4:]])
    data = read_source(SourceConfig(name="cx", path=str(folder), language="de"))
    assert [d.text for d in data.documents] == ["Erster Satz über Straßen.", "日本語の文。", "Zweiter Satz."]
    assert [p.rsplit("/", 1)[1] for p in data.stats.files] == ["data-00000-of-00002.arrow",
                                                                "data-00001-of-00002.arrow"]
    one_file = read_source(SourceConfig(name="cx", path=str(folder / "data-00001-of-00002.arrow"), language="de"))
    assert [d.text for d in one_file.documents] == ["日本語の文。", "Zweiter Satz."]


def test_dataset_dict_dir_picks_the_configured_split(tmp_path):
    root = tmp_path / "xlsum"
    write_saved_dataset(root / "train", [[{"inputs": "Artikel", "targets": "Kurz.", "language": "de"}]])
    write_saved_dataset(root / "test", [[{"inputs": "Test-Artikel", "targets": "Test.", "language": "de"}]], "test")
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    src = SourceConfig(name="xlsum", path=str(root), task="summarization")
    assert [d.inputs for d in read_source(src).documents] == ["Artikel"]
    assert [d.targets for d in read_source(src.model_copy(update={"split": "test"})).documents] == ["Test."]
    assert error(read_source, src.model_copy(update={"split": "validation"})) == (
        f"{root}: no split 'validation' in this dataset (splits: train, test); set the source's 'split'")


def test_missing_field_names_the_file_and_lists_the_columns(tmp_path):
    path = write_parquet(tmp_path / "web.parquet", [{"content": "x", "lang": "de"}])
    assert error(read_source, SourceConfig(name="w", path=path, language="de")) == (
        f"{path}: missing field 'text' (columns: content, lang)")
    assert error(read_source, SourceConfig(name="w", path=path, text_field="content")) == (
        f"{path}: missing field 'language' (columns: content, lang)")
    assert error(read_source, SourceConfig(name="w", path=path, task="sft", language="de")) == (
        f"{path}: missing field 'inputs' (columns: content, lang)")
    folder = tmp_path / "saved"
    write_saved_dataset(folder, [[{"body": "x"}]])
    arrow = str(folder / "data-00000-of-00001.arrow")
    assert error(read_source, SourceConfig(name="s", path=str(folder), language="de")) == (
        f"{arrow}: missing field 'text' (columns: body)")
    numbers = write_parquet(tmp_path / "numbers.parquet", [{"text": 3}])
    assert "row 0: field 'text' must be a string, found int" in error(
        read_source, SourceConfig(name="n", path=numbers, language="de"))


def test_files_that_are_not_parquet_or_arrow_and_broken_metadata(tmp_path):
    fake = tmp_path / "fake.parquet"
    fake.write_text("just some text pretending\n", encoding="utf-8")
    assert error(read_source, SourceConfig(name="f", path=str(fake), language="en")).startswith(
        f"{fake}: not a Parquet file (")
    fake_arrow = tmp_path / "fake.arrow"
    fake_arrow.write_bytes(b"\x00\x01 not arrow at all")
    assert error(read_source, SourceConfig(name="f", path=str(fake_arrow), language="en")).startswith(
        f"{fake_arrow}: not an Arrow IPC stream or file (")
    folder = tmp_path / "saved"
    write_saved_dataset(folder, [[{"text": "a"}], [{"text": "b"}]])
    (folder / "data-00001-of-00002.arrow").unlink()
    assert error(read_source, SourceConfig(name="s", path=str(folder), language="en")) == (
        f"{folder / 'data-00001-of-00002.arrow'}: data file listed in {folder / 'state.json'} is missing")
    (folder / "state.json").write_text("{broken")
    assert "cannot read this `datasets` metadata file" in error(
        read_source, SourceConfig(name="s", path=str(folder), language="en"))


def test_arrow_ipc_file_format_is_read_too(tmp_path):
    path = tmp_path / "table.arrow"
    table = pa.Table.from_pylist([{"text": "feather eins"}, {"text": "feather zwei"}])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    assert [d.text for d in read_source(SourceConfig(name="f", path=str(path), language="de")).documents] == [
        "feather eins", "feather zwei"]
