"""Zero-mismatch rollouts: the log-prob each token was sampled with equals the trainer's
recomputed log-prob bit for bit (``np.array_equal``), in fp32 and bf16, for mixed-length
sequences from several prompts decoded over refilled slots, with the trainer at other batch
sizes. Also the mismatch / routing metrics on hand-computed cases, the routed-expert packer, and
the rule the kernel-invariant model's GEMMs rest on (fixed-shape tiles: a row's result does not
depend on the row count nor on its place in the tile)."""

import jax
import jax.numpy as jnp
import numpy as np
from models.nemotron_h.invariant import ROW_TILE, idot
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
