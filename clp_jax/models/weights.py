"""How one Hugging Face tensor maps onto parameters of our tree (and back), tensor by tensor."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One HF tensor <-> one or more parameters. ``hf_name`` is relative to the base-model prefix
    (``transformer.``, ``model.``) unless ``top_level`` (e.g. ``lm_head.weight``)."""

    hf_name: str
    paths: tuple[Path, ...]
    to_params: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]
    top_level: bool = False


def lookup(tree: Any, at: Path) -> Any:
    """The leaf of a nested-dict parameter tree at a path."""
    for key in at:
        tree = tree[key]
    return tree


def path(name: str) -> Path:
    return tuple(name.split("/"))


def copy(hf_name: str, param: str, top_level: bool = False) -> WeightSpec:
    """Same layout on both sides (embeddings, norms, biases of matching shape)."""
    return WeightSpec(hf_name, (path(param),), lambda a: (a,), lambda a: a, top_level)


def reshaped(hf_name: str, param: str, shape: tuple[int, ...]) -> WeightSpec:
    """Same memory order, different shape (e.g. a [H*D] bias -> [H, D])."""
    return WeightSpec(hf_name, (path(param),), lambda a: (a.reshape(shape),), lambda a: a.reshape(-1))


def torch_linear(hf_name: str, param: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                 top_level: bool = False) -> WeightSpec:
    """torch.nn.Linear weight [out, in] <-> kernel [*in_shape, *out_shape]."""
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
    return WeightSpec(
        hf_name, (path(param),),
        lambda a: (np.ascontiguousarray(a.T).reshape(in_shape + out_shape),),
        lambda k: np.ascontiguousarray(k.reshape(n_in, n_out).T),
        top_level,
    )


def conv1d(hf_name: str, param: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> WeightSpec:
    """GPT-2 Conv1D weight [in, out] <-> kernel [*in_shape, *out_shape]."""
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
    return WeightSpec(hf_name, (path(param),), lambda a: (a.reshape(in_shape + out_shape),),
                      lambda k: k.reshape(n_in, n_out))


def split(hf_name: str, params: tuple[str, ...], to_parts: Callable[[np.ndarray], tuple[np.ndarray, ...]],
          from_parts: Callable[..., np.ndarray]) -> WeightSpec:
    """One fused HF tensor (GPT-2 c_attn, BLOOM query_key_value) <-> several parameters."""
    return WeightSpec(hf_name, tuple(path(p) for p in params), to_parts, from_parts)
