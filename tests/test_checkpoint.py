"""Hub checkpoint I/O: bitwise round trips, the Hub layout on disk, transformers reloading our
export, verbatim config/tokenizer copies, sharded loading, and clear errors on bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from models.nemotron_h import (CheckpointError, ModelConfig, forward, load_checkpoint, preset,
                               save_checkpoint)
from models.nemotron_h.params import FP32_PARAMS, ParamSpec, param_specs
from tests.multidevice import run_on_cpu_devices
from tests.oracle_util import run_oracle

CFG = preset("tiny")  # all four layer kinds, 8 experts in 2 groups


def random_params(cfg: ModelConfig, seed: int, dtype) -> dict:
    """Random params (numpy-generated, fast) with non-trivial values for every leaf."""
    rng = np.random.default_rng(seed)

    def gen(kp, spec: ParamSpec):
        name, shape = kp[-1].key, spec.shape
        if name == "A_log":
            v = np.log(rng.uniform(0.5, 8.0, shape))
        elif name == "dt_bias":
            v = rng.uniform(-6.0, -1.0, shape)
        elif name in ("D", "e_score_correction_bias", "conv_b"):
            v = (1.0 if name == "D" else 0.1) * rng.standard_normal(shape)
        elif len(shape) == 1:  # norms
            v = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name in ("embed", "conv_w"):
            v = (1.0 if name == "embed" else 0.5) * rng.standard_normal(shape)
        else:  # [.., in, out]
            v = rng.standard_normal(shape) / np.sqrt(shape[-2])
        return jnp.asarray(v, jnp.float32 if spec.fp32 else dtype)

    return jax.tree_util.tree_map_with_path(gen, param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))


def assert_bitwise_equal(a, b):
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for (kp, x), y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        name = jax.tree_util.keystr(kp)
        assert x.dtype == y.dtype and x.shape == y.shape, f"{name}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}"
        u = {2: np.uint16, 4: np.uint32}[x.dtype.itemsize]
        assert np.array_equal(x.view(u), y.view(u)), f"{name}: values differ"


@pytest.fixture(scope="module")
def params32():
    return random_params(CFG, 0, jnp.float32)


@pytest.fixture(scope="module")
def params16():
    return random_params(CFG, 0, jnp.bfloat16)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, params32):
    """A good single-file fp32 checkpoint that the bad-input tests copy and corrupt."""
    d = tmp_path_factory.mktemp("ckpt") / "base"
    save_checkpoint(params32, CFG, d)
    return d


def _header(file: Path) -> dict:
    """{name: (safetensors dtype, shape)} from the file header."""
    with safe_open(file, "numpy") as f:
        assert f.metadata() == {"format": "pt"}
        return {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}


def _copy(base: Path, tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    shutil.copytree(base, d)
    return d


def _rewrite(d: Path, fn):
    """Applies ``fn(dict of numpy tensors) -> dict`` to ``d/model.safetensors``."""
    t = load_file(d / "model.safetensors")
    save_file(fn(t), d / "model.safetensors", metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# round trips and layout


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("max_shard_bytes", [5e9, 20_000])
def test_roundtrip_bitwise(tmp_path, params32, params16, dtype, max_shard_bytes):
    p = params32 if dtype == "float32" else params16
    d = tmp_path / "out"
    save_checkpoint(p, CFG, d, max_shard_bytes=max_shard_bytes)
    files = sorted(os.listdir(d))
    if max_shard_bytes == 5e9:
        assert files == ["config.json", "model.safetensors"]
    else:
        shards = [f for f in files if f.endswith(".safetensors")]
        n = len(shards)
        assert n > 3 and shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
        index = json.loads((d / "model.safetensors.index.json").read_text())
        stored, total = {}, 0
        for f in shards:
            for k, (dt, shape) in _header(d / f).items():
                stored[k] = f
                total += int(np.prod(shape)) * {"BF16": 2, "F32": 4}[dt]
        assert index["weight_map"] == stored
        assert index["metadata"]["total_size"] == total
    cfg2, p2 = load_checkpoint(d)
    assert cfg2 == CFG and cfg2.hf_source == str(d)
    assert_bitwise_equal(p, p2)


def test_roundtrip_without_conv_bias(tmp_path):
    cfg = preset("tiny", use_conv_bias=False)
    p = random_params(cfg, 3, jnp.bfloat16)
    for i, k in enumerate(cfg.pattern):
        if k == "M":
            p["layers"][i]["mixer"]["conv_b"] = jnp.zeros_like(p["layers"][i]["mixer"]["conv_b"])
    save_checkpoint(p, cfg, tmp_path / "o")
    assert "backbone.layers.0.mixer.conv1d.bias" not in _header(tmp_path / "o" / "model.safetensors")
    cfg2, p2 = load_checkpoint(tmp_path / "o")
    assert cfg2 == cfg
    assert_bitwise_equal(p, p2)
    p["layers"][0]["mixer"]["conv_b"] = p["layers"][0]["mixer"]["conv_b"] + 1
    with pytest.raises(CheckpointError, match="conv_b"):
        save_checkpoint(p, cfg, tmp_path / "o2")
    assert not (tmp_path / "o2").exists()


def test_hub_layout_on_disk(tmp_path, params16):
    save_checkpoint(params16, CFG, tmp_path / "o")
    c = CFG
    Di, GN, Hm, C = c.d_inner, c.n_groups * c.ssm_state_size, c.mamba_num_heads, c.conv_dim
    shapes = _header(tmp_path / "o" / "model.safetensors")
    n_expected = 3 + sum({"M": 9, "E": 5 + 2 * c.n_routed_experts, "*": 5, "-": 3}[k] for k in c.pattern)
    assert len(shapes) == n_expected
    assert all(k.startswith("backbone.") or k == "lm_head.weight" for k in shapes)
    assert shapes["backbone.embeddings.weight"] == ("BF16", [c.vocab_size, c.hidden_size])
    assert shapes["lm_head.weight"] == ("BF16", [c.vocab_size, c.hidden_size])
    m = "backbone.layers.0.mixer."
    assert shapes[m + "in_proj.weight"] == ("BF16", [Di + C + Hm, c.hidden_size])
    assert shapes[m + "conv1d.weight"] == ("BF16", [C, 1, c.conv_kernel])
    assert shapes[m + "A_log"] == ("F32", [Hm]) and shapes[m + "D"] == ("F32", [Hm])
    assert shapes[m + "out_proj.weight"] == ("BF16", [c.hidden_size, Di])
    e = "backbone.layers.1.mixer."
    assert shapes[e + "gate.e_score_correction_bias"] == ("F32", [c.n_routed_experts])
    assert shapes[e + "gate.weight"] == ("BF16", [c.n_routed_experts, c.hidden_size])
    for j in range(c.n_routed_experts):
        assert shapes[e + f"experts.{j}.up_proj.weight"] == ("BF16", [c.moe_intermediate_size, c.hidden_size])
        assert shapes[e + f"experts.{j}.down_proj.weight"] == ("BF16", [c.hidden_size, c.moe_intermediate_size])
    # fused in_proj rows are z | x | B | C | dt, each our [in, out] matrix transposed
    with safe_open(tmp_path / "o" / "model.safetensors", "numpy") as sf:
        w = np.asarray(sf.get_tensor(m + "in_proj.weight"))
        conv = np.asarray(sf.get_tensor(m + "conv1d.weight"))
        up3 = np.asarray(sf.get_tensor(e + "experts.3.up_proj.weight"))
    mp = params16["layers"][0]["mixer"]
    want = np.concatenate([np.asarray(mp[k]).T for k in ("in_z", "in_x", "in_B", "in_C", "in_dt")])
    assert np.array_equal(w.view(np.uint16), want.view(np.uint16))
    assert np.array_equal(conv[:, 0, :].view(np.uint16), np.asarray(mp["conv_w"]).T.view(np.uint16))
    assert np.array_equal(up3.view(np.uint16),
                          np.asarray(params16["layers"][1]["mixer"]["experts_up"][3]).T.view(np.uint16))
    assert ModelConfig.from_json_file(tmp_path / "o" / "config.json") == CFG


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("max_shard_bytes", [5e9, 20_000])
def test_params_layout_roundtrip_bitwise(tmp_path, params32, params16, dtype, max_shard_bytes):
    """The params layout (the disk weight sync's): one tensor per leaf named by its pytree path,
    our shapes and dtypes byte for byte (read back with the safetensors library itself, so any
    safetensors reader can), the layout in the metadata, and a bit-exact load."""
    from models.nemotron_h.checkpoint import PARAMS_LAYOUT
    p = params32 if dtype == "float32" else params16
    d = tmp_path / "out"
    save_checkpoint(p, CFG, d, max_shard_bytes=max_shard_bytes, layout="params")
    shards = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    flat = {jax.tree_util.keystr(kp, simple=True, separator="."): np.asarray(x)
            for kp, x in jax.tree_util.tree_flatten_with_path(p)[0]}
    # expected shards, derived here: leaves in pytree order, a new shard when the next leaf
    # would take a non-empty one past max_shard_bytes (5e9: one file; 20,000 B: several)
    want: list = [[]]
    for k, x in flat.items():
        if want[-1] and sum(flat[j].nbytes for j in want[-1]) + x.nbytes > max_shard_bytes:
            want.append([])
        want[-1].append(k)
    assert len(shards) == len(want) and (len(want) > 1) == (max_shard_bytes < sum(x.nbytes for x in flat.values()))
    if len(want) > 1:
        names = [f"model-{i + 1:05d}-of-{len(want):05d}.safetensors" for i in range(len(want))]
        assert shards == names
        assert json.loads((d / "model.safetensors.index.json").read_text())["weight_map"] == {
            k: names[i] for i, ks in enumerate(want) for k in ks}
    stored = {}
    for f in shards:
        with safe_open(d / f, "numpy") as sf:
            assert sf.metadata() == {"format": "np", "layout": PARAMS_LAYOUT}
            stored.update({k: sf.get_tensor(k) for k in sf.keys()})
    assert sorted(stored) == sorted(flat) and "layers.0.mixer.in_z" in stored
    for k, x in flat.items():
        assert stored[k].dtype == x.dtype and stored[k].shape == x.shape, k
        assert stored[k].tobytes() == x.tobytes(), k
    cfg2, p2 = load_checkpoint(d)
    assert cfg2 == CFG and cfg2.hf_source == str(d)
    assert_bitwise_equal(p, p2)


def test_params_layout_cast_sharding_and_errors(tmp_path, params32):
    """Params layout: the ``dtype`` cast and a ``sharding`` (slice reads) as for the Hub layout;
    a tensor of the wrong shape, a missing one and a mix of layouts are named; a bad ``layout``
    argument is refused."""
    d = tmp_path / "p"
    save_checkpoint(params32, CFG, d, layout="params")
    dev = jax.devices()[0]
    _, p = load_checkpoint(d, dtype=jnp.bfloat16, sharding=jax.sharding.SingleDeviceSharding(dev))
    want = jax.tree_util.tree_map_with_path(
        lambda kp, x: x if kp[-1].key in FP32_PARAMS else x.astype(jnp.bfloat16), params32)
    assert_bitwise_equal(want, p)
    _, p = load_checkpoint(d, dtype=jnp.bfloat16)
    assert_bitwise_equal(want, p)
    with pytest.raises(ValueError, match="layout must be one of"):
        save_checkpoint(params32, CFG, tmp_path / "x", layout="torch")
    t = load_file(d / "model.safetensors")
    with safe_open(d / "model.safetensors", "numpy") as sf:
        meta = sf.metadata()
    t["layers.0.mixer.in_z"] = t["layers.0.mixer.in_z"][:, :-1].copy()
    del t["norm_f"]
    save_file(t, d / "model.safetensors", metadata=meta)
    with pytest.raises(CheckpointError,
                       match=r"(?s)2 problems.*'layers\.0\.mixer\.in_z'.*: shape.*missing tensor 'norm_f'"):
        load_checkpoint(d)
    h = tmp_path / "mixed"
    save_checkpoint(params32, CFG, h, max_shard_bytes=20_000)
    first = sorted(h.glob("model-*.safetensors"))[0]
    save_file(load_file(first), first, metadata=meta)
    with pytest.raises(CheckpointError, match="mix the Hub and the params layout"):
        load_checkpoint(h)


def test_nano_30b_hub_tensor_names():
    """The loader's expected Hub tensors for the real 30B config (nothing allocated): 3 + 23 Mamba
    layers x 9 + 6 attention x 5 + 23 MoE x (5 + 2 x 128) = 6,243 tensors, fp32 only for A_log, D,
    e_score_correction_bias."""
    from models.nemotron_h.checkpoint import _is_plan, _plans
    cfg = preset("nano-30b-a3b")
    plans = jax.tree.leaves(_plans(cfg, set()), is_leaf=_is_plan)
    names = [s.name for p in plans for s in p.sources]
    assert len(set(names)) == 6243  # (the fused in_proj feeds 5 leaves)
    assert names.count("backbone.layers.1.mixer.experts.127.down_proj.weight") == 1
    fp32 = {n.rsplit(".", 1)[-1] for p in plans if p.fp32 for n in [s.name for s in p.sources]}
    assert fp32 == {"A_log", "D", "e_score_correction_bias"}
    in_proj = [s for p in plans for s in p.sources if s.name.endswith("layers.0.mixer.in_proj.weight")][0]
    assert in_proj.shape == (10304, 2688)


def test_load_dtype_cast_and_single_device_sharding(base_dir, params32):
    dev = jax.devices()[0]
    cfg, p = load_checkpoint(base_dir, dtype=jnp.bfloat16, sharding=jax.sharding.SingleDeviceSharding(dev))
    for kp, x in jax.tree_util.tree_flatten_with_path(p)[0]:
        assert x.dtype == (jnp.float32 if kp[-1].key in FP32_PARAMS else jnp.bfloat16), kp
        assert x.sharding == jax.sharding.SingleDeviceSharding(dev)
    want = jax.tree_util.tree_map_with_path(
        lambda kp, x: x if kp[-1].key in FP32_PARAMS else x.astype(jnp.bfloat16), params32)
    assert_bitwise_equal(want, p)
    with pytest.raises(ValueError, match="floating"):
        load_checkpoint(base_dir, dtype=jnp.int32)


def test_load_named_sharding_8_devices(base_dir):
    """A NamedSharding pytree on 8 simulated CPU devices (a child process: the device count is
    fixed at JAX start-up): every leaf lands in its sharding with the same values as an
    unsharded load."""
    res = run_on_cpu_devices(__file__, "named_sharding", base_dir, timeout=300)
    assert res["n_split"] > 10, res


def _named_sharding_child(ckpt: str) -> None:
    """The child of :func:`test_load_named_sharding_8_devices` (asserts; prints its JSON)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from models.nemotron_h.params import logical_axes

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    rules = {"experts": "model", "vocab": "model", "ssm_inner": "model", "mlp": "model",
             "q_heads": "model", "embed": "data", "conv_dim": "model"}
    cfg0, ref = load_checkpoint(ckpt)

    def spec(axes, x):
        parts = [rules.get(a) if x.shape[i] % mesh.shape.get(rules.get(a), 1) == 0 else None
                 for i, a in enumerate(axes)]
        return NamedSharding(mesh, P(*parts))

    shard = jax.tree.map(spec, logical_axes(cfg0), ref, is_leaf=lambda t: isinstance(t, tuple))
    cfg, p = load_checkpoint(ckpt, sharding=shard)
    n_split = 0
    for x, y, s in zip(jax.tree.leaves(p), jax.tree.leaves(ref), jax.tree.leaves(shard)):
        assert x.sharding == s, (x.sharding, s)
        assert np.array_equal(np.asarray(x), np.asarray(y))
        n_split += any(d is not None for d in s.spec)
    e = p["layers"][1]["mixer"]["experts_up"]
    assert e.addressable_shards[0].data.shape == (cfg.n_routed_experts // 4, cfg.hidden_size // 2,
                                                  cfg.moe_intermediate_size)
    # the same through the params layout (each device reads its slice of the stored leaf)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(ref, dataclasses.replace(cfg0, hf_source=None), Path(tmp) / "p", layout="params")
        _, q = load_checkpoint(Path(tmp) / "p", sharding=shard)
    for x, y, s in zip(jax.tree.leaves(q), jax.tree.leaves(ref), jax.tree.leaves(shard)):
        assert x.sharding == s, (x.sharding, s)
        assert np.array_equal(np.asarray(x), np.asarray(y))
    print(json.dumps({"n_split": n_split}))


def test_accepts_prefix_variants_stacked_experts_and_ignores_mtp(tmp_path, base_dir, params32):
    """``model.`` prefix, singular ``embedding``, transformers-5 stacked experts, ``mtp.*`` extras."""
    d = _copy(base_dir, tmp_path)
    E = CFG.n_routed_experts

    def fn(t):
        out = {}
        for i, kind in enumerate(CFG.pattern):
            if kind == "E":
                for hub in ("up_proj", "down_proj"):
                    pre = f"backbone.layers.{i}.mixer.experts."
                    out[f"model.layers.{i}.mixer.experts.{hub}"] = np.stack(
                        [t.pop(pre + f"{j}.{hub}.weight") for j in range(E)])
        for k, v in t.items():
            k = k.replace("backbone.embeddings.", "backbone.embedding.") if "embeddings" in k else k
            out[k.replace("backbone.", "model.", 1) if "layers.0" in k or "norm_f" in k else k] = v
        out["mtp.layers.0.norm.weight"] = np.ones(4, np.float32)
        out["backbone.mtp.layers.0.eh_proj.weight"] = np.ones((4, 4), np.float32)
        return out

    _rewrite(d, fn)
    _, p = load_checkpoint(d)
    assert_bitwise_equal(params32, p)


# ---------------------------------------------------------------------------------------------
# config and tokenizer files


def _hub_like_source(tmp_path, params32) -> Path:
    """A checkpoint as found on the Hub: pattern string, legacy alias, extra keys, own formatting,
    tokenizer files, plus files that must not be copied."""
    src = tmp_path / "src"
    save_checkpoint(params32, CFG, src)
    d = CFG.to_hf_dict()
    d.pop("layers_block_type")
    d["mamba_chunk_size"] = d.pop("chunk_size")
    d["auto_map"] = {"AutoConfig": "configuration_nemotron_h.NemotronHConfig"}
    d["custom_key"] = [1, 2, 3]
    (src / "config.json").write_text(json.dumps(d, indent=4, sort_keys=True))
    files = {"generation_config.json": '{"eos_token_id": [2, 11]}', "tokenizer.json": '{"v": 1}',
             "tokenizer_config.json": '{"chat_template": "x"}', "special_tokens_map.json": "{}",
             "chat_template.jinja": "{{ messages }}", "configuration_nemotron_h.py": "# remote code\n"}
    for k, v in files.items():
        (src / k).write_text(v)
    (src / "notes.txt").write_text("not copied")
    return src


def test_export_copies_config_and_tokenizer_verbatim(tmp_path, params32):
    src = _hub_like_source(tmp_path, params32)
    cfg, p = load_checkpoint(src)
    assert cfg == CFG and cfg.hf_source == str(src)
    out = tmp_path / "out"
    save_checkpoint(p, cfg, out)
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "configuration_nemotron_h.py"):
        assert (out / f).read_bytes() == (src / f).read_bytes(), f
    assert not (out / "notes.txt").exists()
    assert_bitwise_equal(p, load_checkpoint(out)[1])

    # jax-only options (dt_floor, kernels) do not count as a change; HF fields do
    save_checkpoint(p, dataclasses.replace(cfg, dt_floor=1e-3, moe_impl="xla"), out)
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    with pytest.warns(UserWarning, match="chunk_size"):
        save_checkpoint(p, dataclasses.replace(cfg, chunk_size=8), out)
    d = json.loads((out / "config.json").read_text())
    assert d["chunk_size"] == 8 and "mamba_chunk_size" not in d and d["custom_key"] == [1, 2, 3]
    assert ModelConfig.from_json_file(out / "config.json") == dataclasses.replace(CFG, chunk_size=8)
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_save_over_its_own_source_replaces_atomically(tmp_path, params32):
    src = _hub_like_source(tmp_path, params32)
    cfg, p = load_checkpoint(src)
    p2 = jax.tree.map(lambda x: x * 2, p)
    save_checkpoint(p2, cfg, src, max_shard_bytes=50_000)
    assert (src / "tokenizer.json").read_text() == '{"v": 1}'
    assert not (src / "model.safetensors").exists()  # replaced by the sharded layout
    assert_bitwise_equal(p2, load_checkpoint(src)[1])
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp dirs left


# ---------------------------------------------------------------------------------------------
# bad input: one CheckpointError naming the problem


def _expect_error(d, *patterns):
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(d)
    msg = str(ei.value)
    for pat in patterns:
        assert re.search(pat, msg), f"{pat!r} not in error: {msg}"
    return msg


def test_bad_config_json(tmp_path, base_dir):
    d = _copy(base_dir, tmp_path)
    (d / "config.json").write_text('{"hidden_size": 64,')
    _expect_error(d, "config.json", "not valid JSON")
    good = CFG.to_hf_dict()
    (d / "config.json").write_text(json.dumps({**good, "hidden_size": "big"}))
    _expect_error(d, "config.json", "hidden_size")
    (d / "config.json").write_text(json.dumps({**good, "layers_block_type": ["mamba", "conv"]}))
    _expect_error(d, "layers_block_type", "conv")
    os.remove(d / "config.json")
    _expect_error(d, "no config.json")
    assert issubclass(CheckpointError, ValueError)


def test_missing_tensor(tmp_path, base_dir):
    d = _copy(base_dir, tmp_path)
    name = "backbone.layers.1.mixer.experts.3.down_proj.weight"
    _rewrite(d, lambda t: {k: v for k, v in t.items() if k != name})
    _expect_error(d, "missing tensor", re.escape(name))


def test_wrong_shape(tmp_path, base_dir):
    d = _copy(base_dir, tmp_path)
    name = "backbone.layers.0.mixer.in_proj.weight"
    _rewrite(d, lambda t: {**t, name: t[name][:-1]})
    _expect_error(d, re.escape(name), "model.safetensors", "shape")


def test_wrong_dtype(tmp_path, base_dir):
    d = _copy(base_dir, tmp_path)
    name = "backbone.layers.2.mixer.q_proj.weight"
    _rewrite(d, lambda t: {**t, name: t[name].astype(np.int32)})
    _expect_error(d, re.escape(name), "I32")


def test_unknown_tensor(tmp_path, base_dir):
    d = _copy(base_dir, tmp_path)
    _rewrite(d, lambda t: {**t, "backbone.layers.0.mixer.foo.weight": np.zeros(3, np.float32)})
    _expect_error(d, "unknown tensor", "backbone.layers.0.mixer.foo.weight")


def test_several_problems_in_one_error(tmp_path, base_dir):
    d = _copy(base_dir, tmp_path)
    _rewrite(d, lambda t: {**{k: v for k, v in t.items() if k != "lm_head.weight"},
                           "extra.weight": np.zeros(1, np.float32)})
    _expect_error(d, "2 problems", "lm_head.weight", "extra.weight")


def test_corrupt_files(tmp_path, base_dir, params32):
    d = _copy(base_dir, tmp_path)
    f = d / "model.safetensors"
    good = f.read_bytes()
    f.write_bytes(good[:-100])
    _expect_error(d, "truncated", "model.safetensors")
    f.write_bytes(b"\x01")
    _expect_error(d, "not a safetensors file", "model.safetensors")
    n = int.from_bytes(good[:8], "little")
    f.write_bytes(good[:8] + b"{" * n + good[8 + n:])  # header of the right length, not JSON
    _expect_error(d, "corrupt", "model.safetensors")
    # sharded: a truncated shard, and the index naming a shard that is gone
    s = tmp_path / "sharded"
    save_checkpoint(params32, CFG, s, max_shard_bytes=50_000)
    shard = sorted(s.glob("model-00002-of-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-1])
    _expect_error(s, "truncated", shard.name)
    os.remove(shard)
    _expect_error(s, "model-00002-of-", "does not exist")
    # the index maps a tensor to another shard than the one holding it
    save_checkpoint(params32, CFG, s, max_shard_bytes=50_000)
    index = json.loads((s / "model.safetensors.index.json").read_text())
    name = "backbone.layers.0.mixer.in_proj.weight"
    other = next(fn for fn in sorted(set(index["weight_map"].values())) if fn != index["weight_map"][name])
    index["weight_map"][name] = other
    (s / "model.safetensors.index.json").write_text(json.dumps(index))
    _expect_error(s, re.escape(name), "model.safetensors.index.json", re.escape(other))


# ---------------------------------------------------------------------------------------------
# transformers reloads our export


@pytest.mark.oracle
def test_export_reloads_in_transformers(tmp_path, params32, params16):
    """Our export (fp32 and bf16) loads in transformers' NemotronHForCausalLM and gives our logits
    (max-abs 1e-4 on fp32 logits; dt_floor = time_step_min as transformers clamps)."""
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 19), dtype=np.int32)
    np.save(tmp_path / "tokens.npy", tokens)
    jobs = []
    for name, p in (("f32", params32), ("bf16", params16)):
        save_checkpoint(p, CFG, tmp_path / name, max_shard_bytes=100_000)
        jobs.append({"op": "logits", "model": str(tmp_path / name), "tokens": str(tmp_path / "tokens.npy"),
                     "out": str(tmp_path / f"{name}.npy")})
    run_oracle(jobs, tmp_path)
    cfg = dataclasses.replace(CFG, dt_floor=CFG.time_step_min)
    fwd = jax.jit(forward, static_argnums=2)
    for name, p in (("f32", params32), ("bf16", params16)):
        want = np.load(tmp_path / f"{name}.npy")
        got = np.asarray(fwd(jax.tree.map(lambda x: x.astype(jnp.float32), p), tokens, cfg))
        assert np.abs(want).max() > 0.5
        err = float(np.abs(got - want).max())
        print(f"export {name}: transformers vs ours max-abs {err:.3g}")
        assert err <= 1e-4, f"{name}: max-abs {err:.3g}"


if __name__ == "__main__":
    if sys.argv[1] == "named_sharding":
        _named_sharding_child(sys.argv[2])
