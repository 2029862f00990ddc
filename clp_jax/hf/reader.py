"""Read a Hugging Face checkpoint dir tensor by tensor straight into sharded device arrays.

Host memory stays near the largest single tensor: each tensor is read (memory-mapped safetensors,
or a memory-mapped ``pytorch_model.bin`` when torch is installed), converted to our layout and
placed on the mesh with ``jax.make_array_from_callback`` before the next one is read.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Collection, Iterator
from typing import Any

import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh

from clp_jax import models
from clp_jax.errors import ClpError, ClpWarning
from clp_jax.models.config import DTYPES, NP_DTYPES, TransformerConfig
from clp_jax.models.weights import WeightSpec, lookup
from clp_jax.progress import bar
from clp_jax.sharding import tree_shardings


def _require_dir(model_dir: str) -> None:
    if not os.path.isdir(model_dir):
        raise ClpError(f"{model_dir}: model directory not found")


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ClpError(f"{path}: not valid JSON ({e})") from None


def read_config_dict(model_dir: str) -> dict[str, Any]:
    """config.json as a dict, with clear errors for a missing or broken file."""
    _require_dir(model_dir)
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ClpError(f"{path}: config.json not found (is {model_dir} a Hugging Face model dir?)")
    data = _read_json(path)
    if not isinstance(data, dict) or "model_type" not in data:
        raise ClpError(f"{path}: no 'model_type' field")
    return data


def read_generation_config(model_dir: str) -> dict[str, Any]:
    """generation_config.json as a dict ({} when the dir has none), with a clear error for a broken file."""
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ClpError(f"{path}: not a generation config (a JSON object)")
    return data


def eos_ids(model_dir: str, tokenizer: Any) -> list[int]:
    """EOS ids from the tokenizer and, when present, generation_config.json (chat models often list several)."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    extra = read_generation_config(model_dir).get("eos_token_id")
    ids += [int(i) for i in ([] if extra is None else extra if isinstance(extra, list) else [extra])]
    return sorted(set(ids))


def dropout_rates(raw: dict[str, Any]) -> dict[str, float]:
    """The config's non-zero dropout rates (``*dropout*``, ``*pdrop*``), but those of heads we never build."""
    return {k: v for k, v in raw.items() if re.search(r"dropout|pdrop", k) and not k.startswith(("summary_",
            "classifier_")) and isinstance(v, int | float) and not isinstance(v, bool) and v > 0}


def read_config(model_dir: str, dtype: str | None = None, param_dtype: str | None = None,
                warn_dropout: bool = False) -> TransformerConfig:
    """Our ``TransformerConfig`` for an HF model dir (param dtype = the checkpoint's unless asked); with
    ``warn_dropout`` (for training), a ClpWarning when config.json sets dropout, which is not implemented."""
    import transformers

    raw = read_config_dict(model_dir)
    path = os.path.join(model_dir, "config.json")
    rates = dropout_rates(raw)
    if warn_dropout and rates:
        listed = ", ".join(f"{k}={v}" for k, v in sorted(rates.items()))
        warnings.warn(f"{path}: sets dropout ({listed}); clp-jax implements no dropout and ignores it, so "
                      "training runs without dropout", ClpWarning, stacklevel=2)
    model_type = raw["model_type"]
    try:
        family = models.family(model_type)
    except ValueError as e:
        raise ClpError(f"{path}: {e}") from None
    try:
        hf = transformers.AutoConfig.for_model(**raw)
        cfg = family.from_hf(hf)
    except (ValueError, TypeError, KeyError) as e:
        raise ClpError(f"{path}: {e}") from None
    stored = param_dtype or _checkpoint_dtype(model_dir) or "float32"
    if stored not in DTYPES:
        stored = "float32"
    return cfg.replace(param_dtype=stored, dtype=dtype or "float32")


class TensorFiles:
    """Name -> file lookup over model.safetensors, sharded safetensors with index, or pytorch_model.bin."""

    def __init__(self, model_dir: str):
        _require_dir(model_dir)
        self.model_dir = model_dir
        self._torch_state: dict[str, Any] | None = None
        single = os.path.join(model_dir, "model.safetensors")
        index = os.path.join(model_dir, "model.safetensors.index.json")
        torch_bin = os.path.join(model_dir, "pytorch_model.bin")
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ClpError(f"{index}: not a safetensors index ({e})") from None
            self.files = {k: os.path.join(model_dir, v) for k, v in weight_map.items()}
        elif os.path.isfile(single):
            self.files = {k: single for k in self._safetensors_keys(single)}
        elif os.path.isfile(torch_bin):
            self.files = {k: torch_bin for k in self._load_torch(torch_bin)}
        else:
            raise ClpError(f"{model_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
        for f in set(self.files.values()):
            if not os.path.isfile(f):
                raise ClpError(f"{f}: weight file listed in the index is missing")

    @staticmethod
    def _safetensors_keys(path: str) -> list[str]:
        from safetensors import safe_open

        try:
            with safe_open(path, framework="numpy") as f:
                return list(f.keys())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ClpError(f"{path}: not a readable safetensors file ({e})") from None

    def _load_torch(self, path: str) -> list[str]:
        try:
            import torch
        except ImportError:
            raise ClpError(f"{path}: reading pytorch_model.bin needs torch; convert to safetensors or "
                           "install torch") from None
        self._torch_state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return list(self._torch_state)

    def get(self, name: str) -> np.ndarray:
        path = self.files[name]
        if self._torch_state is not None:
            t = self._torch_state[name]
            if str(t.dtype) == "torch.bfloat16":
                return t.view(__import__("torch").int16).numpy().view(ml_dtypes.bfloat16)
            return t.numpy()
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            return f.get_tensor(name)

    def dtype_name(self) -> str | None:
        """The floating dtype most tensors are stored in ('float32', 'bfloat16', 'float16')."""
        first = next(iter(self.files), None)
        if first is None:
            return None
        if self._torch_state is not None:
            return str(self._torch_state[first].dtype).removeprefix("torch.")
        from safetensors import safe_open

        with safe_open(self.files[first], framework="numpy") as f:
            code = f.get_slice(first).get_dtype()
        return {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(code)


def _checkpoint_dtype(model_dir: str) -> str | None:
    try:
        return TensorFiles(model_dir).dtype_name()
    except ClpError:
        return None


def hf_key(files: TensorFiles, spec: WeightSpec, prefix: str) -> str | None:
    """The checkpoint's name for ``spec``: with or without the base-model prefix."""
    for name in ([spec.hf_name] if spec.top_level else [prefix + spec.hf_name, spec.hf_name]):
        if name in files.files:
            return name
    return None


def iter_hf_params(model_dir: str, cfg: TransformerConfig, only: Collection[tuple[str, ...]] | None = None
                   ) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """(param path, host array in our layout and ``cfg.param_dtype``) one tensor at a time."""
    files = TensorFiles(model_dir)
    family = models.family(cfg.arch)
    shapes = models.param_shapes(cfg)
    np_dtype = NP_DTYPES[cfg.param_dtype]
    for spec in family.weight_specs(cfg):
        if only is not None and not set(spec.paths) & set(only):
            continue
        key = hf_key(files, spec, family.BASE_PREFIX)
        if key is None:
            raise ClpError(f"{model_dir}: checkpoint has no tensor {family.BASE_PREFIX + spec.hf_name!r} "
                           f"(needed by model_type {cfg.arch!r})")
        raw = files.get(key)
        try:
            parts = spec.to_params(raw)
        except ValueError:
            parts = None
        for path, part in zip(spec.paths, parts or [None] * len(spec.paths)):
            want = lookup(shapes, path).shape
            if part is None or part.shape != want:
                raise ClpError(f"{files.files[key]}: tensor {key!r} has shape {tuple(raw.shape)}, which contradicts "
                               f"config.json (expected parameter {'/'.join(path)} of shape {want})")
            yield path, np.asarray(part, dtype=np_dtype)


def _insert(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def load_params(model_dir: str, mesh: Mesh, cfg: TransformerConfig | None = None, progress: bool = True,
                only: Collection[tuple[str, ...]] | None = None) -> tuple[TransformerConfig, dict]:
    """Config and sharded parameters of an HF model dir, each tensor placed as soon as it is read.

    ``only`` restricts loading to those parameter paths (e.g. just the embeddings).
    """
    cfg = cfg or read_config(model_dir)
    shardings = tree_shardings(models.param_axes(cfg), models.param_shapes(cfg), mesh)
    params: dict = {}
    n = len(only) if only is not None else len(jax.tree.leaves(shardings))
    with bar(total=n, desc=f"load {os.path.basename(os.path.normpath(model_dir))}", unit="tensor",
             disable=not progress, leave=False) as progress_bar:
        for path, host in iter_hf_params(model_dir, cfg, only):
            sharding = lookup(shardings, path)
            _insert(params, path, jax.make_array_from_callback(host.shape, sharding, lambda idx, h=host: h[idx]))
            progress_bar.update(1)
    return cfg, params


__all__ = ["DTYPES", "TensorFiles", "iter_hf_params", "load_params", "read_config", "read_config_dict",
           "read_generation_config"]
