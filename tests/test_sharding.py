"""Activation sharding constraints from the rules table: `constrain` and where the train step uses it."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from clp_jax.models import transformer
from clp_jax.models.config import TransformerConfig
from clp_jax.sharding import constrain, make_mesh
from clp_jax.train.optimizer import OptimizerConfig, make_optimizer
from clp_jax.train.state import abstract_state, state_shardings
from clp_jax.train.step import make_train_step


def test_constrain_without_a_mesh_is_the_identity():
    x = jnp.ones((4, 3, 2))
    assert constrain(x, ("batch", "length", "embed")) is x


def test_constrain_under_a_mesh_applies_the_rules_table():
    mesh = make_mesh(2, 2, 2)

    def f(x):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return constrain(x * 2, ("batch", "length", "vocab"))

    x = jax.device_put(np.ones((4, 3, 8), np.float32), NamedSharding(mesh, PartitionSpec()))
    out = jax.jit(f)(x)
    assert out.sharding.spec == PartitionSpec(("data", "fsdp"), None, "tensor")
    np.testing.assert_array_equal(out, 2 * np.ones((4, 3, 8)))


def test_train_step_pins_the_residual_stream_to_the_batch_axes(monkeypatch):
    """fsdp = 8 with a vocabulary 8 does not divide: every layer's output is pinned batch-sharded, embed whole,
    and compiles so; the compiled step takes and returns the state with its rules-table shardings."""
    cfg = TransformerConfig(arch="gpt2", vocab_size=301, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=4,
                            head_dim=16, intermediate_size=256, norm="layernorm", norm_eps=1e-5,
                            activation="gelu_tanh", gated_mlp=False, position="learned", max_position_embeddings=32)
    mesh = make_mesh(1, 8, 1)
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-3, total_steps=10))
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    batch = {k: jax.ShapeDtypeStruct((16, 32), np.int32, sharding=batch_sharding)
             for k in ("tokens", "segment_ids", "positions")}
    pins, compiled_as = [], []
    pin = jax.lax.with_sharding_constraint

    def recording_pin(x, spec):  # what `constrain` asks XLA for
        pins.append((x.shape, spec))
        return pin(x, spec)

    def inspected(x, axes):  # the sharding XLA gives the model's residual stream in the compiled step
        out = constrain(x, axes)
        jax.debug.inspect_array_sharding(out, callback=compiled_as.append)
        return out

    monkeypatch.setattr(jax.lax, "with_sharding_constraint", recording_pin)
    monkeypatch.setattr(transformer, "constrain", inspected)
    compiled = make_train_step(cfg, tx, mesh).lower(abstract_state(cfg, mesh, tx), batch).compile()
    residual, batch_rows = (16, 32, cfg.hidden_size), PartitionSpec("fsdp", None, None)
    assert sum(shape == residual and spec == batch_rows for shape, spec in pins) >= cfg.num_layers + 1
    assert len(compiled_as) == cfg.num_layers + 1  # the embeddings' output and every block's
    assert all(s.is_equivalent_to(NamedSharding(mesh, batch_rows), 3) for s in compiled_as)
    (state_in, batch_in), _ = compiled.input_shardings
    state_out, _ = compiled.output_shardings
    assert all(s.is_equivalent_to(batch_sharding, 2) for s in batch_in.values())
    wanted = jax.tree.leaves(state_shardings(cfg, mesh, tx))
    ins = jax.tree.leaves(state_in, is_leaf=lambda x: x is None)  # None: an input the step never reads
    shapes, outs = jax.tree.leaves(abstract_state(cfg, mesh, tx)), jax.tree.leaves(state_out)
    assert len(wanted) == len(ins) == len(outs) == len(shapes) and sum(s is None for s in ins) <= 1
    for shape, want, got_in, got_out in zip(shapes, wanted, ins, outs):
        assert got_out.is_equivalent_to(want, shape.ndim)
        assert got_in is None or got_in.is_equivalent_to(want, shape.ndim)


def test_a_dimension_can_claim_mesh_axes_first():
    """The loss's logits: vocab claims fsdp before the batch does, so they split like the output layer's rows."""
    from clp_jax.sharding import logical_to_spec

    mesh = make_mesh(2, 4, 1, devices=jax.devices())
    axes, shape = ("batch", "length", "vocab"), (8, 4, 64)
    assert logical_to_spec(axes, shape, mesh) == PartitionSpec(("data", "fsdp"), None, None)
    assert logical_to_spec(axes, shape, mesh, first=2) == PartitionSpec("data", None, "fsdp")
    assert logical_to_spec(axes, (8, 4, 66), mesh, first=2) == PartitionSpec(("data", "fsdp"), None, None)
