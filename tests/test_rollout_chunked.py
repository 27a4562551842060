"""Chunked prefill: ``prefill_continue`` (a chunk that continues a row's cache) against one
``prefill`` of the whole sequence, and the engine's chunked admission against unchunked.

Tolerance: fp32 logits / cache within 1e-5 absolute (the split changes only the summation order
of the SSD scan's chunks and the attention softmax over more keys); engine log-probs within
1e-6 and greedy tokens equal, as the issue asks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.nemotron_h import init_cache, prefill, prefill_continue

TOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tiny_cfg, tiny_params):
    cfg = tiny_cfg()
    return cfg, tiny_params(cfg)


def _assert_cache_equal(got, want, lengths, err):
    """Mamba conv / SSM state everywhere; K/V only at each row's valid positions."""
    for i, (g, w) in enumerate(zip(got, want)):
        for name in w:
            a, b = np.asarray(g[name]), np.asarray(w[name])
            if name in ("k", "v"):
                for r, n in enumerate(lengths):
                    np.testing.assert_allclose(a[r, :n], b[r, :n], atol=TOL, rtol=0,
                                               err_msg=f"{err}: layer {i} {name} row {r}")
            else:
                np.testing.assert_allclose(a, b, atol=TOL, rtol=0, err_msg=f"{err}: layer {i} {name}")


# conv kernel 4 (window 3) and SSD chunk 16 in the tiny preset: splits at 1 and 2 leave the conv
# window partly from the zero start, 18 and 9+7 land inside an SSD chunk and a conv window
@pytest.mark.parametrize("splits", [(1,), (2,), (9, 16), (18,), (5, 6, 7, 8)])
def test_prefill_continue_equals_one_prefill(tiny, splits):
    cfg, params = tiny
    T, S = 26, 32
    toks = jax.random.randint(jax.random.key(5), (2, T), 0, cfg.vocab_size)
    want_logits, want_cache = prefill(params, toks, cfg, max_len=S)
    cache = init_cache(cfg, 2, S, dtype=jnp.float32)
    bounds = (0,) + tuple(splits) + (T,)
    got = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        logits, cache = prefill_continue(params, cache, toks[:, a:b], jnp.full((2,), a), cfg)
        got.append(logits)
    np.testing.assert_allclose(jnp.concatenate(got, 1), want_logits, atol=TOL, rtol=0)
    _assert_cache_equal(cache, want_cache, (T, T), f"splits {splits}")


def test_prefill_continue_ragged_rows(tiny):
    """Rows at different positions with right-padded chunks of different valid lengths (one row
    with nothing to add keeps its state): next-token logits and cache equal one prefill each."""
    cfg, params = tiny
    S = 40
    rows = [jax.random.randint(jax.random.key(11 + i), (n,), 0, cfg.vocab_size)
            for i, n in enumerate((7, 30, 12))]
    first = (3, 17, 12)  # tokens prefilled before the continued chunk
    cache = init_cache(cfg, 3, S, dtype=jnp.float32)
    pad = lambda xs, w: jnp.stack([jnp.pad(x, (0, w - len(x))) for x in xs])
    head = pad([r[:f] for r, f in zip(rows, first)], 17)
    head_last, cache = prefill_continue(params, cache, head, jnp.zeros(3, jnp.int32), cfg,
                                        lengths=jnp.array(first), last_only=True)
    tail = [r[f:] for r, f in zip(rows, first)]
    last, cache = prefill_continue(params, cache, pad(tail, 13), jnp.array(first), cfg,
                                   lengths=jnp.array([len(x) for x in tail]), last_only=True)
    for i, r in enumerate(rows):
        want_logits, want_cache = prefill(params, r[None], cfg, max_len=S, last_only=True)
        got = last[i] if len(tail[i]) else head_last[i]  # nothing added: the head's logits stand
        np.testing.assert_allclose(got, want_logits[0], atol=TOL, rtol=0, err_msg=f"row {i}")
        mine = [{k: v[i:i + 1] for k, v in layer.items()} for layer in cache]
        _assert_cache_equal(mine, want_cache, (len(r),), f"row {i}")
