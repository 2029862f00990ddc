"""Activation sharding constraints from the rules table: `constrain` and where the train step uses it."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from clp_jax.models.config import TransformerConfig
from clp_jax.sharding import constrain, make_mesh
from clp_jax.train.optimizer import OptimizerConfig, make_optimizer
from clp_jax.train.state import abstract_state
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


def test_train_step_pins_the_residual_stream_to_the_batch_axes():
    """fsdp = 8 with a vocabulary 8 does not divide: every layer's output stays batch-sharded, embed whole."""
    cfg = TransformerConfig(arch="gpt2", vocab_size=301, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=4,
                            head_dim=16, intermediate_size=256, norm="layernorm", norm_eps=1e-5,
                            activation="gelu_tanh", gated_mlp=False, position="learned", max_position_embeddings=32)
    mesh = make_mesh(1, 8, 1)
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-3, total_steps=10))
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    batch = {k: jax.ShapeDtypeStruct((16, 32), np.int32, sharding=batch_sharding)
             for k in ("tokens", "segment_ids", "positions")}
    text = make_train_step(cfg, tx, mesh).lower(abstract_state(cfg, mesh, tx), batch).as_text()
    pinned = [line for line in text.splitlines()
              if 'sdy.sharding_constraint' in line and '[{"fsdp"}, {}, {}]> : tensor<16x32x64xf32>' in line]
    assert len(pinned) >= cfg.num_layers + 1  # the embeddings' output and every block's
