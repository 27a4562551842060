"""Zero-mismatch rollouts: the log-prob each token was sampled with equals the trainer's
recomputed log-prob bit for bit (``np.array_equal``), in fp32 and bf16, for mixed-length
sequences from several prompts decoded over refilled slots, with the trainer at other batch
sizes. Also the mismatch / routing metrics on hand-computed cases, the routed-expert packer, and
the rule the kernel-invariant model's GEMMs rest on (fixed-shape tiles: a row's result does not
depend on the row count nor on its place in the tile), and the two invariant kernels built on it
whose work follows the data: the grouped MoE and the causally skipping block attention."""

import jax
import jax.numpy as jnp
import numpy as np
from models.nemotron_h import invariant
from models.nemotron_h.invariant import KV_BLOCK, Q_CHUNK, ROW_TILE, idot
import pytest

from cascade_jax import rl
from cascade_jax.rollout.exact import generate_exact
from cascade_jax.rollout.types import sample_seed
from models import nemotron_h as nh

R, CHUNK = 24, 128  # row length (engine and trainer); vocab chunk (512 = 4 chunks)
PROMPTS = [[5, 9, 31], [7, 1, 8, 100, 201, 3, 4], [11, 12, 13, 14, 15], list(range(40, 51)),
           [300, 301, 302, 303]]
STOPS = tuple(range(0, 512, 9))  # ~11% of the vocabulary: responses of mixed lengths


def _batch(samples, T):
    n = len(samples)
    tok = np.zeros((n, T), np.int32)
    seg = np.zeros((n, T), np.int32)
    mask = np.zeros((n, T), np.float32)
    lp = np.zeros((n, T), np.float32)
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        tok[i, :p], tok[i, p:p + r] = s.prompt_ids, s.response_ids
        seg[i, :p + r] = 1
        mask[i, p:p + r] = 1
        lp[i, p:p + r] = s.logprobs
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (n, T))
    return rl.SFTBatch(tokens=tok, positions=pos, segment_ids=seg, loss_mask=mask), lp


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.integration
def test_sampling_logprobs_equal_trainer_bitwise(dtype):
    cfg = nh.preset("tiny")
    master = nh.init_params(cfg, jax.random.key(0), jnp.float32)
    params = rl.compute_params(master, nh.param_specs(cfg), dtype)
    samples = generate_exact(params, cfg, PROMPTS, row_len=R, num_slots=2, max_new_tokens=8,
                             seed=3, stop_token_ids=STOPS, return_routed_experts=True,
                             vocab_chunk=CHUNK)
    lens = [len(s.response_ids) for s in samples]
    assert len(set(lens)) > 1 and "stop" in {s.finish_reason for s in samples}, lens
    batch, rollout_lp = _batch(samples, R)
    m = batch.loss_mask > 0
    tl = jax.jit(lambda p, b: rl.token_logprobs(p, b, cfg, vocab_chunk=CHUNK, row_len=R))
    exact = np.asarray(tl(params, batch)[0])
    assert np.array_equal(exact[m], rollout_lp[m])  # 5 rows vs the engine's 2 slots
    sub = jax.tree.map(lambda x: x[1:3], batch)  # another batch size
    assert np.array_equal(np.asarray(tl(params, sub)[0])[m[1:3]], rollout_lp[1:3][m[1:3]])
    metrics = rl.logprob_mismatch(jnp.asarray(exact), jnp.asarray(rollout_lp), batch.loss_mask)
    assert float(metrics["mismatch_abs_max"]) == 0.0 and float(metrics["mismatch_exact_frac"]) == 1.0
    # the default (batched) trainer path is not exact: report its residual beside it
    default = np.asarray(jax.jit(lambda p, b: rl.token_logprobs(p, b, cfg, vocab_chunk=CHUNK))(params, batch)[0])
    resid = float(np.abs(default[m] - rollout_lp[m]).max())
    print(f"\n{jnp.dtype(dtype).name}: exact-mode max |dlogp| 0.0; default trainer path {resid:.3g}")
    assert resid < (1e-5 if dtype == jnp.float32 else 2e-2)
    # routed experts: SGLang layout [P + R - 1, L_moe, K], equal to the trainer's row forward
    L, K = nh.num_moe_layers(cfg), cfg.num_experts_per_tok
    for s in samples:
        assert s.routed_experts.shape == (len(s.prompt_ids) + len(s.response_ids) - 1, L, K)
    packed = rl.pack_routed_experts([s.routed_experts for s in samples], R, num_experts=cfg.n_routed_experts)
    row_fwd = jax.jit(lambda p, t, s: jax.lax.map(
        lambda r: nh.hidden_states(p, r[0][None], cfg, positions=jnp.arange(R)[None],
                                   segment_ids=r[1][None], return_routed_experts=True)[1][0], (t, s)))
    trainer_rx = row_fwd(params, batch.tokens, batch.segment_ids)
    rm = rl.routing_mismatch(jnp.asarray(packed), trainer_rx, batch.segment_ids)
    assert float(rm["routing_token_diff_frac"]) == 0.0


def _row_reference(params, cfg, prompts, seeds, *, max_new_tokens, temperature, stops):
    """The row form written out, one prompt at a time: token ``t`` of prompt ``i`` is drawn from
    ``next_token_logprobs`` of its row alone (``[1, R]``) by Gumbel-max at unit temperature with
    the key ``fold_in(key(s_i), t)`` (argmax at τ = 0), its log-prob that distribution's entry;
    routed experts those of the forward the last token was drawn from. -> ``[(tokens, logps,
    reason, experts)]``."""
    nxt = jax.jit(lambda p, row, n, inv: rl.next_token_logprobs(
        p, row, n, cfg, inv_temperature=inv, vocab_chunk=CHUNK, return_routed_experts=True))
    inv = rl.inverse_temperature([temperature])
    out = []
    for prompt, s in zip(prompts, seeds):
        key = jax.random.wrap_key_data(jnp.asarray([(s >> 32) & 0xFFFFFFFF, s & 0xFFFFFFFF], jnp.uint32))
        row, toks, lps, reason = list(prompt), [], [], None
        while reason is None:
            buf = np.zeros((1, R), np.int32)
            buf[0, :len(row)] = row
            logp, rx = nxt(params, buf, np.asarray([len(row)], np.int32), inv)
            logp = np.asarray(logp[0])
            if temperature > 0:
                g = np.asarray(jax.random.gumbel(jax.random.fold_in(key, len(toks)), logp.shape, jnp.float32))
                y = int(np.argmax(logp + g))
            else:
                y = int(np.argmax(logp))
            toks.append(y)
            lps.append(logp[y])
            reason = "stop" if y in stops else ("length" if len(toks) == max_new_tokens else None)
            experts = np.asarray(rx[0, :len(row)])
            row.append(y)
        out.append((toks, np.asarray(lps, np.float32), reason, experts))
    return out


@pytest.mark.parametrize("temperature", [0.7, 0.0])  # τ = 1: the bitwise test above
def test_generate_exact_equals_the_row_reference(temperature):
    """``generate_exact`` (2 refilled slots, 5 prompts of mixed lengths) gives the written-out
    row reference's tokens, log-probs, finish reasons and routed experts exactly."""
    cfg = nh.preset("tiny")
    params = nh.init_params(cfg, jax.random.key(1), jnp.float32)
    seeds = [sample_seed(3, i) for i in range(len(PROMPTS))]
    samples = generate_exact(params, cfg, PROMPTS, row_len=R, num_slots=2, max_new_tokens=8,
                             seed=3, stop_token_ids=STOPS, return_routed_experts=True,
                             vocab_chunk=CHUNK, temperature=temperature)
    ref = _row_reference(params, cfg, PROMPTS, seeds, max_new_tokens=8, temperature=temperature,
                         stops=set(STOPS))
    for s, (toks, lps, reason, experts) in zip(samples, ref):
        assert s.response_ids.tolist() == toks and s.finish_reason == reason
        assert np.array_equal(s.logprobs, lps)
        assert np.array_equal(s.routed_experts, experts)
    if temperature > 0:
        assert len({len(t) for t, *_ in ref}) > 1  # mixed lengths: slots refilled


def test_logprob_mismatch_hand_computed():
    train = jnp.array([[0.0, -1.0, -2.0, -3.0], [0.0, -0.5, -0.5, 0.0]])
    roll = jnp.array([[9.0, -1.0, -2.5, -3.0], [0.0, -0.5, -2.0, 0.0]])
    mask = jnp.array([[0, 1, 1, 1], [0, 1, 1, 0]], jnp.float32)
    m = rl.logprob_mismatch(train, roll, mask, low=0.5, high=2.0)
    # deltas on mask: 0, 0.5, 0, 0, 1.5 -> ratios 1, e^.5 (1.65, in band), 1, 1, e^1.5 (4.48, out)
    assert float(m["mismatch_abs_max"]) == pytest.approx(1.5)
    assert float(m["mismatch_abs_mean"]) == pytest.approx(2.0 / 5)
    assert float(m["mismatch_exact_frac"]) == pytest.approx(3 / 5)
    assert float(m["mismatch_out_of_band"]) == pytest.approx(1 / 5)


def test_routing_mismatch_hand_computed():
    a = jnp.array([[[[1, 2], [3, 4]], [[5, 6], [7, 0]], [[-1, -1], [-1, -1]]]])  # [1, 3, 2, 2]
    b = jnp.array([[[[2, 1], [3, 4]], [[5, 6], [7, 1]], [[0, 1], [2, 3]]]])
    m = rl.routing_mismatch(a, b, jnp.ones((1, 3)))
    # token 0: same sets (order ignored); token 1: layer 1 differs; token 2: no rollout routing
    assert float(m["routing_token_diff_frac"]) == pytest.approx(0.5)
    assert float(m["routing_layer_diff_frac"]) == pytest.approx(0.25)


def test_pack_routed_experts_layout_and_errors():
    a = np.arange(3 * 2 * 2).reshape(3, 2, 2) % 8
    out = rl.pack_routed_experts([a, a[:1]], 5, num_experts=8)
    assert out.shape == (2, 5, 2, 2) and out.dtype == np.int32
    np.testing.assert_array_equal(out[0, :3], a)
    assert (out[0, 3:] == -1).all() and (out[1, 1:] == -1).all()
    with pytest.raises(ValueError, match=r"routed_experts\[1\]: expected shape"):
        rl.pack_routed_experts([a, a[:, :1]], 5, num_experts=8)
    with pytest.raises(ValueError, match=r"routed_experts\[0\]: 3 tokens at offset 0 exceed T=2"):
        rl.pack_routed_experts([a], 2, num_experts=8)
    with pytest.raises(ValueError, match=r"routed_experts\[0\]: expert id outside"):
        rl.pack_routed_experts([a + 8], 5, num_experts=8)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_tiled_gemm_rows_do_not_depend_on_row_count_or_place(bf16):
    """``invariant.idot`` (one ``[ROW_TILE, K] @ [K, N]`` GEMM per tile of rows): every row of a
    product over 1 to 40 rows at offsets 0 and 5 (so at every place in a tile) equals, bit for
    bit, that row computed alone (one real row in a tile of padding), under ``jit`` and inside
    ``value_and_grad``; and the product is ``x @ w`` (float64 numpy, |Δ| <= 1e-5 · ‖x_i‖‖w‖)."""
    rng = np.random.default_rng(0)
    rnd = (lambda a: jax.lax.reduce_precision(a, 8, 7)) if bf16 else (lambda a: a)
    for K, N in [(64, 96), (17, 33), (64, 512)]:
        x = rnd(jnp.asarray(rng.standard_normal((40, K)), jnp.float32))
        w = rnd(jnp.asarray(rng.standard_normal((K, N)), jnp.float32))
        f = jax.jit(idot)
        alone = np.concatenate([np.asarray(f(x[i:i + 1], w)) for i in range(40)])
        ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
        bound = 1e-5 * np.linalg.norm(np.asarray(x), axis=1, keepdims=True) * np.linalg.norm(np.asarray(w))
        assert (np.abs(alone - ref) <= bound).all(), (K, N)
        for n, off in [(3, 5), (ROW_TILE + 1, 0), (ROW_TILE + 1, 5), (35, 5), (40, 0)]:
            assert np.array_equal(np.asarray(f(x[off:off + n], w)), alone[off:off + n]), (K, N, n, off)
        grad_y = jax.jit(jax.value_and_grad(lambda a, b: (jnp.sin(idot(a, b)).sum(), idot(a, b)),
                                            argnums=(0, 1), has_aux=True))
        (_, y), _ = grad_y(x[:30].reshape(2, 15, K), w)
        assert np.array_equal(np.asarray(y).reshape(30, N), alone[:30]), (K, N)


sg = jax.lax.stop_gradient


def _bf16(a):
    return jax.lax.reduce_precision(a, exponent_bits=8, mantissa_bits=7)


@pytest.mark.parametrize("bf16", [pytest.param(False, marks=pytest.mark.slow), True],
                         ids=["fp32", "bf16"])
def test_grouped_moe_rows_do_not_depend_on_batch_or_place(bf16):
    """``invariant.moe`` (pairs sorted by expert into tiles of one expert): a token's output is
    the same bits alone (a 1-token decode step), in a 3-token batch, in a 2 x 40 training batch,
    with the tokens shuffled, under ``jit`` and inside a ``value_and_grad`` program, on the tiny
    model (E/K = 8/2, routed by its router) and at E/K = 32/2 with routing replay crowding 70 of 80
    tokens onto one expert (a group of several tiles). The invariant kernels are forward only
    (loops of data-dependent length): in a gradient program they give values, as in the trainer.
    Against the default model's ``moe_mixer`` (XLA's sort + grouped matmul, the same experts):
    fp32 |Δ| <= 1e-6 · max|ref|; bf16 <= 2^-7 · max|ref| (one bf16 rounding of the output at its
    largest value)."""
    dtype = jnp.bfloat16 if bf16 else jnp.float32
    rnd = _bf16 if bf16 else (lambda a: a)
    for over, crowded in (({}, False), ({"n_routed_experts": 32, "n_group": 1}, True)):
        cfg = nh.preset("tiny", **over)
        params = rl.compute_params(nh.init_params(cfg, jax.random.key(0), jnp.float32),
                                   nh.param_specs(cfg), dtype)
        p = params["layers"][cfg.pattern.index("E")]["mixer"]
        x = rnd(jax.random.normal(jax.random.key(1), (2, 40, cfg.hidden_size)))
        ids = None
        if crowded:
            E = cfg.n_routed_experts
            crowd = np.array(jax.random.randint(jax.random.key(2), (2, 40, 2), 0, E))
            crowd[..., 0][np.arange(80).reshape(2, 40) % 8 != 0] = 3  # 70 tokens on expert 3
            crowd[..., 1] = np.where(crowd[..., 1] == crowd[..., 0], (crowd[..., 0] + 1) % E,
                                     crowd[..., 1])
            ids = jnp.asarray(crowd, jnp.int32)
        sl = lambda a, b, c: None if ids is None else ids[a, b:c]
        f = jax.jit(lambda p, x, i: invariant.moe(p, x, cfg, dtype, i))
        y, used = f(p, x, ids)
        y = np.asarray(y)
        assert np.array_equal(np.asarray(f(p, x[1, 7:8], sl(1, 7, 8))[0]), y[1, 7:8])
        assert np.array_equal(np.asarray(f(p, x[0, 30:33], sl(0, 30, 33))[0]), y[0, 30:33])
        perm = np.random.default_rng(0).permutation(80)
        xs = x.reshape(80, -1)[perm].reshape(2, 40, -1)
        ps = None if ids is None else ids.reshape(80, 2)[perm].reshape(2, 40, 2)
        back = np.empty_like(y.reshape(80, -1))
        back[perm] = np.asarray(f(p, xs, ps)[0]).reshape(80, -1)
        assert np.array_equal(back, y.reshape(80, -1))
        # in a gradient program as the trainer runs it: values from the invariant kernels
        # (forward only), the gradient from the default model
        ref_fn = lambda p, x: nh.model.moe_mixer(p, x.astype(dtype), cfg, expert_ids=ids,
                                                 return_expert_ids=True)
        g = jax.jit(jax.value_and_grad(lambda p, x: (
            jnp.sum(ref_fn(p, x)[0] ** 2), (invariant.moe(sg(p), sg(x), cfg, dtype, ids)[0],
                                            ref_fn(p, x))), has_aux=True, argnums=(0, 1)))
        (_, (y_g, (r, r_used))), _ = g(p, x)
        assert np.array_equal(np.asarray(y_g), y)
        assert np.array_equal(np.asarray(r_used), np.asarray(used))
        r = np.asarray(r, np.float32)
        tol = (2.0 ** -7 if bf16 else 1e-6) * np.abs(r).max()
        assert np.abs(y - r).max() <= tol, (over, np.abs(y - r).max(), tol)


def test_block_attention_training_form_equals_decode_across_query_chunks():
    """A 2 x 300-token causal attention (GQA 4/2 heads; ``Q_CHUNK`` queries per chunk, so several
    chunks, each visiting the key blocks up to its last query only) equals, bit for bit at 24
    positions spread over the row, the decode form (one query, a 320-key cache with the future
    keys garbage), fp32 and bf16 values; and equals softmax attention (float64 numpy) to
    1e-5 in fp32."""
    T, D = 300, 16
    assert T > 2 * Q_CHUNK
    Tk = -(-T // KV_BLOCK) * KV_BLOCK
    ks = jax.random.split(jax.random.key(0), 3)
    q0, k0, v0 = (jax.random.normal(kk, (2, T, h, D)) for kk, h in zip(ks, (4, 2, 2)))
    at = np.linspace(0, T - 1, 24).astype(np.int32)
    for dtype, rnd in ((jnp.float32, lambda a: a), (jnp.bfloat16, _bf16)):
        q, k, v = rnd(q0), rnd(k0), rnd(v0)
        pad = lambda a: jnp.pad(a, ((0, 0), (0, Tk - T), (0, 0), (0, 0)))
        full = jax.jit(lambda q, k, v: invariant.block_attention(
            q, pad(k), pad(v), jnp.broadcast_to(jnp.arange(T), (2, T)), dtype))(q, k, v)
        garbage = jnp.full((2, Tk - T, 2, D), 7.0)
        kc, vc = (jnp.concatenate([a, garbage], 1) for a in (k, v))
        for b in range(2):  # decode: 24 slots, slot i at position at[i]
            n = len(at)
            kc_b = jnp.broadcast_to(kc[b], (n, Tk, 2, D))
            vc_b = jnp.broadcast_to(vc[b], (n, Tk, 2, D))
            kc_b = jnp.where(jnp.arange(Tk)[None, :, None, None] <= at[:, None, None, None], kc_b, 9.0)
            dec = jax.jit(lambda q, k, v, pos: invariant.block_attention(q, k, v, pos[:, None], dtype))(
                q[b, at][:, None], kc_b, vc_b, jnp.asarray(at))
            assert np.array_equal(np.asarray(dec[:, 0]), np.asarray(full[b, at])), (dtype, b)
        if dtype == jnp.float32:
            qn = np.asarray(q, np.float64)
            kn, vn = (np.repeat(np.asarray(a, np.float64), 2, axis=2) for a in (k, v))  # GQA
            s = np.einsum("bqhd,bkhd->bhqk", qn, kn) / np.sqrt(D)
            s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
            w = np.exp(s - s.max(-1, keepdims=True))
            ref = np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), vn)
            assert np.abs(np.asarray(full) - ref).max() <= 1e-5
