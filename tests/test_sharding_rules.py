"""The rules table and the mesh, in-process (no devices needed): logical names -> PartitionSpec,
the errors for impossible layouts (each names the mesh axis), mesh-size resolution, and the
model's ``constrain`` hook being the identity without a partitioner."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cascade_jax import sharding
from cascade_jax.config import MeshConfig
from cascade_jax.sharding import RULES, ShardingError, logical_to_spec
from models import nemotron_h as nh
from models.nemotron_h.partitioning import constrain, use_partitioner

MESH = {"data": 2, "fsdp": 4, "expert": 8, "context": 1, "tensor": 2}


def test_weight_specs_follow_the_table():
    w = RULES.weights
    assert logical_to_spec(("experts", "embed", "expert_mlp"), w, mesh_shape=MESH) == P("expert", "fsdp", "tensor")
    assert logical_to_spec(("embed", "q_heads"), w, mesh_shape=MESH) == P("fsdp", "tensor")
    # size-1 axes (context) drop out; replicated trailing dims are trimmed
    assert logical_to_spec(("batch", "seq", "embed"), RULES.activations, mesh_shape=MESH) == P(("data", "fsdp", "expert"))
    assert logical_to_spec(("norm",), w, mesh_shape=MESH) == P()


def test_every_param_axis_is_in_the_table():
    cfg = nh.preset("nano-30b-a3b")
    axes = {a for t in jax.tree.leaves(nh.logical_axes(cfg), is_leaf=lambda x: isinstance(x, tuple)) for a in t}
    assert axes <= set(RULES.weights), axes - set(RULES.weights)


def test_axis_used_twice_is_an_error_naming_it():
    with pytest.raises(ShardingError, match="mesh axis 'tensor' used twice"):
        logical_to_spec(("q_heads", "mlp"), RULES.weights, mesh_shape=MESH)


def test_axis_not_dividing_a_dim_is_an_error_naming_it():
    with pytest.raises(ShardingError, match=r"mesh axis 'fsdp' \(fsdp=4\) does not divide dim 0 \('embed', size 6\)"):
        logical_to_spec(("embed", "q_heads"), RULES.weights, mesh_shape=MESH, shape=(6, 8))
    with pytest.raises(ShardingError, match="unknown logical axis 'embedd'"):
        logical_to_spec(("embedd",), RULES.weights)


def test_mesh_sizes():
    assert sharding.resolve_sizes(MeshConfig(data=2, fsdp=-1, tensor=2), 16)["fsdp"] == 4
    with pytest.raises(ShardingError, match="multiply to 6, not the 8 devices"):
        sharding.resolve_sizes(MeshConfig(data=3, fsdp=2), 8)
    with pytest.raises(ShardingError, match=r"mesh.fsdp: the other axes \(3 devices\)"):
        sharding.resolve_sizes(MeshConfig(data=3, fsdp=-1), 8)


def test_model_level_checks_name_the_axis():
    cfg = nh.preset("tiny")  # 2 KV heads, 2 B/C groups, 8 experts
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1, 1), sharding.MESH_AXES)
    sharding.validate_model_mesh(cfg, mesh)
    wide = sharding.Rules(weights={**RULES.weights, "kv_heads": ("data",)}, activations=RULES.activations)

    class FakeMesh:  # only the axis sizes are read
        axis_names = sharding.MESH_AXES
        devices = np.empty((4, 1, 1, 1, 1))

    with pytest.raises(ShardingError, match="mesh axis 'data' \\(size 4\\) does not divide num_key_value_heads=2"):
        sharding.validate_model_mesh(cfg, FakeMesh(), wide)


def test_constrain_is_identity_without_partitioner():
    x = jnp.arange(6.0).reshape(1, 2, 3)
    assert constrain(x, ("batch", "seq", "embed")) is x
    seen = []
    with use_partitioner(lambda a, names: seen.append(names) or a):
        constrain(x, ("batch", "seq", "embed"))
    assert seen == [("batch", "seq", "embed")]
    assert constrain(x, ("batch", "seq", "embed")) is x  # the context is gone again
    with use_partitioner(lambda a, names: a), pytest.raises(ValueError, match="3 logical names"):
        constrain(x[0], ("batch", "seq", "embed"))


def test_cluster_detection():
    from cascade_jax.sharding.distributed import cluster_detected
    assert not cluster_detected({})
    assert not cluster_detected({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"})  # one task: no join
    assert cluster_detected({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"})
    assert cluster_detected({"OMPI_COMM_WORLD_SIZE": "4"})
    assert not cluster_detected({"TPU_WORKER_HOSTNAMES": "localhost"})  # a single-host TPU VM
    assert cluster_detected({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"})
    assert cluster_detected({"CASCADE_DISTRIBUTED": "1"})


def test_weights_are_sharded_over_fsdp_and_context():
    """ZeRO-3 over every token-splitting axis that holds no other weight dim: with a context
    axis the weights' hidden dim is split over fsdp x context, so the master weights, Adam
    moments and gradients are sharded over all the devices of an fsdp x context mesh."""
    mesh = {"data": 1, "fsdp": 8, "expert": 1, "context": 8, "tensor": 1}
    w = RULES.weights
    assert logical_to_spec(("experts", "embed", "expert_mlp"), w, mesh_shape=mesh) == P(None, ("fsdp", "context"))
    assert logical_to_spec(("embed",), w, mesh_shape={**mesh, "fsdp": 1}) == P("context")
    with pytest.raises(ShardingError, match=r"mesh axis 'context' \(fsdp=8 x context=8\) does not divide dim 0"):
        logical_to_spec(("embed",), w, mesh_shape=mesh, shape=(96,))
