"""cascade_jax.rl pure-array functions vs independent NumPy implementations of the formulas
(docs/algorithms.md §5–§8). Tolerances: float32 math, compared at rtol 1e-5 / atol 1e-6 unless said."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

import cascade_jax.rl as rl
from cascade_jax.config import ConfigError, StageConfig

RTOL, ATOL = 1e-5, 1e-6


# ---------------------------------------------------------------------------------------------
# NumPy references (written from the formulas, loops on purpose)


def np_group_adv(r, ids, loo=False, valid=None, eps=1e-6):
    r = np.asarray(r, np.float64)
    ids = np.asarray(ids)
    valid = np.ones(len(r), bool) if valid is None else np.asarray(valid, bool)
    out = np.zeros(len(r))
    for i in range(len(r)):
        if not valid[i]:
            continue
        members = [j for j in range(len(r)) if ids[j] == ids[i] and valid[j]]
        rg = r[members]
        if rg.max() == rg.min():
            continue
        std = np.sqrt(np.mean((rg - rg.mean()) ** 2))
        base = (rg.sum() - r[i]) / (len(rg) - 1) if loo else rg.mean()
        out[i] = (r[i] - base) / (std + eps)
    return out


def np_is_weight(train_lp, roll_lp, mode, cap=2.0, lo=0.5, hi=2.0):
    r = np.exp(train_lp - roll_lp)
    if mode == "none":
        return 1.0
    if mode == "tis":
        return min(r, cap)
    return r if lo <= r <= hi else 0.0


def np_grpo(lp, old, adv, mask, roll=None, ref=None, n=None, kl=0.0, eps_lo=0.2, eps_hi=0.2,
            mode="tis", cap=2.0, lo=0.5, hi=2.0):
    B, T = lp.shape
    old = lp if old is None else old
    adv = np.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, (B, T))
    n = mask.sum() if n is None else n
    tot = 0.0
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            ratio = np.exp(lp[b, t] - old[b, t])
            a = adv[b, t]
            pg = -min(ratio * a, np.clip(ratio, 1 - eps_lo, 1 + eps_hi) * a)
            w = 1.0 if roll is None else np_is_weight(old[b, t], roll[b, t], mode, cap, lo, hi)
            tot += w * pg
            if kl:
                d = ref[b, t] - lp[b, t]
                tot += kl * (np.exp(d) - d - 1)
    return tot / n


def np_mopd(lp, teacher, inf, mask, lo=0.5, hi=2.0, per="sequence", dom=None):
    """``dom``: each row's domain (needed for ``per="domain"``)."""
    B, T = lp.shape
    rows, tot, ntok = [], 0.0, 0
    dsum, dtok = {}, {}
    for b in range(B):
        s, v = 0.0, 0
        for t in range(T):
            if not mask[b, t]:
                continue
            v += 1
            r = np.exp(lp[b, t] - inf[b, t])
            w = r if lo <= r <= hi else 0.0
            s += w * (teacher[b, t] - lp[b, t]) * lp[b, t]
        if v:
            rows.append(s / v)
            k = 0 if dom is None else dom[b]
            dsum[k], dtok[k] = dsum.get(k, 0.0) + s, dtok.get(k, 0) + v
        tot += s
        ntok += v
    if per == "domain":
        return -np.mean([dsum[d] / dtok[d] for d in dsum])
    return -np.mean(rows) if per == "sequence" else -tot / ntok


def np_mopd_grad(lp, teacher, inf, mask, lo=0.5, hi=2.0):
    """d L / d lp with a and w held fixed (stop-gradient)."""
    g = np.zeros_like(lp)
    nseq = (mask.sum(1) > 0).sum()
    for b in range(lp.shape[0]):
        v = mask[b].sum()
        for t in range(lp.shape[1]):
            if mask[b, t]:
                r = np.exp(lp[b, t] - inf[b, t])
                w = r if lo <= r <= hi else 0.0
                g[b, t] = -w * (teacher[b, t] - lp[b, t]) / v / nseq
    return g


def hand_batch(seed=0):
    """6 responses in 3 groups of unequal sizes {3, 2, 1}; group 1 all-equal; varying lengths;
    rollout log-probs with tokens far outside the IS window."""
    rng = np.random.default_rng(seed)
    B, T = 6, 7
    lengths = [7, 4, 1, 5, 0, 3]  # row 4: fully masked
    mask = np.zeros((B, T), np.float32)
    for b, L in enumerate(lengths):
        mask[b, T - L:] = 1.0  # prompt on the left, response on the right
    mask[0, 3] = 0.0  # a masked hole inside a response
    lp = -rng.uniform(0.1, 3.0, (B, T)).astype(np.float32)
    delta = rng.normal(0, 0.3, (B, T)).astype(np.float32)
    delta[0, 5], delta[1, 6], delta[3, 4], delta[5, 5] = 1.2, -1.0, 0.8, -0.9  # outside [0.5, 2]
    roll = (lp - delta).astype(np.float32)
    teacher = (lp + rng.normal(0, 0.5, (B, T))).astype(np.float32)
    ref = (lp + rng.normal(0, 0.2, (B, T))).astype(np.float32)
    rewards = np.array([1.0, 0.0, 0.5, 1.0, 1.0, 0.3], np.float32)
    ids = np.array([7, 7, 7, 3, 3, 9], np.int32)
    return dict(mask=mask, lp=lp, roll=roll, teacher=teacher, ref=ref, rewards=rewards, ids=ids)


# ---------------------------------------------------------------------------------------------
# Advantages


@pytest.mark.parametrize("loo", [False, True])
def test_group_advantages_ids_unequal_sizes(loo):
    r = np.array([1.0, 0.0, 0.5, 1.0, 1.0, 0.3, 2.0, 0.0, 0.0, 1.0], np.float32)
    ids = np.array([4, 4, 4, 1, 1, 8, 2, 2, 2, 2])
    got = rl.group_advantages(jnp.asarray(r), jnp.asarray(ids), leave_one_out=loo)
    want = np_group_adv(r, ids, loo)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert np.all(np.asarray(got)[3:6] == 0.0)  # all-equal group and singleton: exactly 0


def test_group_advantages_group_size_and_values():
    r = np.array([0.1, 0.1, 0.1, 0.1, 0.0, 1.0, 1.0, 0.0], np.float32)
    got = np.asarray(rl.group_advantages(jnp.asarray(r), 4))
    assert np.all(got[:4] == 0.0)  # 0.1 is not exact in binary: still exactly zero
    # mean 0.5, population std of {0,1,1,0} is 0.5 -> ±0.5/(0.5+1e-6)
    np.testing.assert_allclose(got[4:], np.array([-.5, .5, .5, -.5]) / (0.5 + 1e-6), rtol=RTOL)
    np.testing.assert_allclose(got, np_group_adv(r, np.arange(8) // 4), rtol=RTOL, atol=ATOL)


def test_group_advantages_valid_mask():
    r = np.array([1.0, 0.0, 0.5, 9.0], np.float32)
    valid = np.array([True, True, True, False])
    got = rl.group_advantages(jnp.asarray(r), 4, valid=jnp.asarray(valid))
    np.testing.assert_allclose(got, np_group_adv(r, np.zeros(4), valid=valid), rtol=RTOL, atol=ATOL)


def test_grpo_advantages_overlong_and_dynamic_filtering():
    r = np.array([1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.2], np.float32)
    ids = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    fr = np.array([0, 1, 0, 0, 0, 0, 0, 2])  # row 1 truncated, row 7 aborted
    # overlong filtering on: truncated keeps its reward in the statistics, then is masked
    adv, keep, _ = rl.grpo_advantages(r, ids, fr, overlong_filtering=True, dynamic_filtering=True)
    valid = fr != 2
    np.testing.assert_allclose(adv, np_group_adv(r, ids, valid=valid), rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(keep, [1, 0, 1, 1, 0, 0, 0, 0])  # group 1 all-equal, group 2 singleton
    # overlong filtering off: truncated -> reward 0 and trained on
    adv, keep, m = rl.grpo_advantages(r, ids, fr, overlong_filtering=False)
    r0 = r.copy()
    r0[1] = 0.0
    np.testing.assert_allclose(adv, np_group_adv(r0, ids, valid=valid), rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(keep, [1, 1, 1, 1, 1, 1, 1, 0])
    np.testing.assert_allclose(m["frac_truncated"], 1 / 7, rtol=RTOL)


def test_flat_groups_is_the_dynamic_filter():
    """One rule for the runner's prompt draw and the step's keep mask: no reward variance among
    a group's valid members (or at most one of them)."""
    r = np.array([1.0, 1.0, 0.0, 1.0, 2.0, 2.0, 0.5, 0.2, 0.3], np.float32)
    np.testing.assert_array_equal(rl.flat_groups(r, 3), [0, 0, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(rl.flat_groups(r[:6], 2), [1, 1, 0, 0, 1, 1])
    valid = np.array([1, 1, 0, 1, 1, 1, 1, 0, 0], bool)  # group 0 then flat, group 2 a singleton
    np.testing.assert_array_equal(rl.flat_groups(r, 3, valid), [1, 1, 1, 0, 0, 0, 1, 1, 1])
    fr = np.array([0, 0, 0, 0, 0, 0, 0, 2, 2])
    _, keep, _ = rl.grpo_advantages(r, np.arange(9) // 3, fr, dynamic_filtering=True)
    np.testing.assert_array_equal(keep, ~np.asarray(rl.flat_groups(r, 3, fr != 2)) & (fr != 2))


# ---------------------------------------------------------------------------------------------
# IS correction


@pytest.mark.parametrize("mode", ["none", "tis", "icepop"])
def test_is_weights_and_metrics(mode):
    d = hand_batch()
    w, m = rl.is_weights(jnp.asarray(d["lp"]), jnp.asarray(d["roll"]), jnp.asarray(d["mask"]), mode=mode)
    want = np.array([[np_is_weight(a, b, mode) * k for a, b, k in zip(ra, rb, rk)]
                     for ra, rb, rk in zip(d["lp"], d["roll"], d["mask"])])
    np.testing.assert_allclose(w, want, rtol=RTOL, atol=ATOL)
    sel = d["mask"] > 0
    ad = np.abs(d["lp"] - d["roll"])[sel]
    np.testing.assert_allclose(m["is_abs_delta_mean"], ad.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["is_abs_delta_p99"], np.percentile(ad, 99), rtol=1e-5)
    np.testing.assert_allclose(m["is_weight_mean"], want[sel].mean(), rtol=1e-5)
    ratio = np.exp(d["lp"] - d["roll"])[sel]
    frac = {"none": 0.0, "tis": (ratio > 2).mean(), "icepop": ((ratio < .5) | (ratio > 2)).mean()}[mode]
    np.testing.assert_allclose(m["is_frac_corrected"], frac, atol=1e-7)
    if mode != "none":
        assert 0 < frac < 0.5  # the hand batch does put tokens outside the window


def test_masked_quantile_matches_numpy():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 9)).astype(np.float32)
    mask = rng.uniform(size=(5, 9)) < 0.6
    for q in (0.0, 0.5, 0.9, 0.99, 1.0):
        np.testing.assert_allclose(rl.masked_quantile(jnp.asarray(x), jnp.asarray(mask), q),
                                   np.quantile(x[mask], q), rtol=1e-6, atol=1e-6)
    assert float(rl.masked_quantile(jnp.asarray(x), jnp.zeros((5, 9)), 0.99)) == 0.0


# ---------------------------------------------------------------------------------------------
# GRPO loss


@pytest.mark.parametrize("mode", ["none", "tis", "icepop"])
@pytest.mark.parametrize("kl", [0.0, 0.03])
def test_grpo_loss_matches_numpy(mode, kl):
    d = hand_batch()
    adv = np_group_adv(d["rewards"], d["ids"]).astype(np.float32)
    n = 40.0  # whole-optimiser-batch token count (more than this micro-batch holds)
    loss, m = rl.grpo_loss(jnp.asarray(d["lp"]), None, jnp.asarray(adv), jnp.asarray(d["mask"]),
                           rollout_logp=jnp.asarray(d["roll"]), ref_logp=jnp.asarray(d["ref"]),
                           num_tokens=n, kl_coef=kl, is_correction=mode)
    want = np_grpo(d["lp"], None, adv, d["mask"], d["roll"], d["ref"], n, kl, mode=mode)
    np.testing.assert_allclose(loss, want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(m["ratio_mean"], 1.0, rtol=1e-7)
    assert float(m["clip_frac"]) == 0.0


def test_grpo_loss_off_policy_clipping_and_token_advantages():
    d = hand_batch(1)
    rng = np.random.default_rng(5)
    old = (d["lp"] + rng.normal(0, 0.4, d["lp"].shape)).astype(np.float32)  # ratios leave [0.8, 1.2]
    adv_tok = rng.normal(size=d["lp"].shape).astype(np.float32)
    loss, m = rl.grpo_loss(jnp.asarray(d["lp"]), jnp.asarray(old), jnp.asarray(adv_tok),
                           jnp.asarray(d["mask"]), rollout_logp=jnp.asarray(d["roll"]),
                           clip_low=0.2, clip_high=0.28)
    want = np_grpo(d["lp"], old, adv_tok, d["mask"], d["roll"], eps_hi=0.28)
    np.testing.assert_allclose(loss, want, rtol=RTOL, atol=ATOL)
    assert 0 < float(m["clip_frac"]) < 1


def test_grpo_gradient_on_policy_is_reinforce():
    """d L / d lp = −mask·w·Â / num_tokens (+ KL term) when ρ ≡ 1."""
    d = hand_batch()
    adv = np_group_adv(d["rewards"], d["ids"]).astype(np.float32)
    for mode in ("none", "tis", "icepop"):
        g = jax.grad(lambda lp: rl.grpo_loss(lp, None, jnp.asarray(adv), jnp.asarray(d["mask"]),
                                             rollout_logp=jnp.asarray(d["roll"]), num_tokens=33.0,
                                             is_correction=mode)[0])(jnp.asarray(d["lp"]))
        w = np.array([[np_is_weight(a, b, mode) for a, b in zip(ra, rb)]
                      for ra, rb in zip(d["lp"], d["roll"])])
        np.testing.assert_allclose(g, -d["mask"] * w * adv[:, None] / 33.0, rtol=RTOL, atol=ATOL)


def test_grpo_micro_batches_sum_to_batch():
    d = hand_batch()
    adv = jnp.asarray(np_group_adv(d["rewards"], d["ids"]).astype(np.float32))
    args = lambda s: (jnp.asarray(d["lp"][s]), None, adv[s], jnp.asarray(d["mask"][s]))
    n = d["mask"].sum()
    full = rl.grpo_loss(*args(slice(None)), rollout_logp=jnp.asarray(d["roll"]))[0]
    parts = sum(rl.grpo_loss(*args(slice(i, i + 2)), rollout_logp=jnp.asarray(d["roll"][i:i + 2]),
                             num_tokens=n)[0] for i in (0, 2, 4))
    np.testing.assert_allclose(parts, full, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# MOPD loss


HAND_DOMAINS = np.array([4, 3, 4, 0, 3, 4], np.int32)  # per row of hand_batch (row 4 empty)


@pytest.mark.parametrize("per", ["sequence", "token", "domain"])
def test_mopd_loss_matches_numpy(per):
    d = hand_batch()
    dom = np.broadcast_to(HAND_DOMAINS[:, None], d["mask"].shape)
    loss, m = rl.mopd_loss(jnp.asarray(d["lp"]), jnp.asarray(d["teacher"]), jnp.asarray(d["roll"]),
                           jnp.asarray(d["mask"]), normalization=per, domain_index=jnp.asarray(dom),
                           num_domains=9)
    np.testing.assert_allclose(loss, np_mopd(d["lp"], d["teacher"], d["roll"], d["mask"], per=per,
                                             dom=HAND_DOMAINS), rtol=RTOL, atol=ATOL)
    sel = d["mask"] > 0
    np.testing.assert_allclose(m["reverse_kl"], (d["lp"] - d["teacher"])[sel].mean(), rtol=1e-5)
    r = np.exp(d["lp"] - d["roll"])[sel]
    np.testing.assert_allclose(m["is_frac_corrected"], ((r < .5) | (r > 2)).mean(), atol=1e-7)
    want_tok = np.zeros(9)
    np.add.at(want_tok, HAND_DOMAINS, d["mask"].sum(1))
    np.testing.assert_array_equal(m["domain_tokens"], want_tok)


def _hand_mopd_case():
    """Three sequences, on-policy (``lp = lp_inf``, so ``w = 1``), one prompt token each:
    A (domain 4) lp [-1], teacher [-0.5] → a·lp = [-0.5]; B (domain 3) lp [-2, -1, -1, -1],
    teacher [-1, -1, -2, -1] → a·lp = [-2, 0, 1, 0]; C (domain 4) lp [-1, -3], teacher [-2, -1]
    → a·lp = [1, -6]. Domain 4: 3 tokens, Σ a·lp = -5.5, Σ|a| = 3.5; domain 3: 4 tokens,
    Σ a·lp = -1, Σ|a| = 2."""
    lp = np.array([[0, -1, 0, 0, 0], [0, -2, -1, -1, -1], [0, -1, -3, 0, 0]], np.float32)
    teacher = np.array([[0, -.5, 0, 0, 0], [0, -1, -1, -2, -1], [0, -2, -1, 0, 0]], np.float32)
    mask = np.array([[0, 1, 0, 0, 0], [0, 1, 1, 1, 1], [0, 1, 1, 0, 0]], np.float32)
    dom = np.broadcast_to(np.array([4, 3, 4], np.int32)[:, None], mask.shape)
    return lp, teacher, mask, dom


# per normalisation: the loss and domain 4's share of the gradient weight Σ c |a|, by hand
#   token:    L = 6.5 / 7;                        share = 3.5 / (3.5 + 2)
#   sequence: L = (0.5/1 + 1/4 + 5/2) / 3 (A, B, C: -Σ a·lp / |V|) = 3.25 / 3;
#             weights A 0.5/(3·1), C 3/(3·2), B 2/(3·4) → share = (1/6 + 1/2) / (1/6 + 1/2 + 1/6)
#   domain:   L = (5.5/3 + 1/4) / 2;              share = (3.5/6) / (3.5/6 + 2/8)
HAND_MOPD = {"token": (6.5 / 7, 3.5 / 5.5), "sequence": (3.25 / 3, 0.8),
             "domain": ((5.5 / 3 + 0.25) / 2, 0.7)}


@pytest.mark.parametrize("per", sorted(HAND_MOPD))
def test_mopd_loss_normalisations_hand_computed(per):
    lp, teacher, mask, dom = _hand_mopd_case()
    loss, m = rl.mopd_loss(jnp.asarray(lp), jnp.asarray(teacher), jnp.asarray(lp), jnp.asarray(mask),
                           normalization=per, domain_index=jnp.asarray(dom), num_domains=9)
    want_loss, want_share = HAND_MOPD[per]
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-6)
    gw = np.asarray(m["domain_grad_weight"])
    assert gw[[0, 1, 2, 5, 6, 7, 8]].sum() == 0.0
    np.testing.assert_allclose(gw[4] / gw.sum(), want_share, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(m["domain_tokens"])[[3, 4]], [4.0, 3.0])
    # the gradient is -c_t a_t per token (w = 1): the weights' sum is Σ |∂L/∂lp|
    g = jax.grad(lambda x: rl.mopd_loss(x, jnp.asarray(teacher), jnp.asarray(lp), jnp.asarray(mask),
                                        normalization=per, domain_index=jnp.asarray(dom),
                                        num_domains=9)[0])(jnp.asarray(lp))
    np.testing.assert_allclose(float(jnp.abs(g).sum()), gw.sum(), rtol=1e-6)


# λ_3 = 2 (structured_output, B), λ_4 = 0.5 (math, A and C), by hand from the case above:
#   token:    L = (0.5·5.5 + 2·1) / 7;                share = 0.5·3.5 / (0.5·3.5 + 2·2)
#   sequence: L = (0.5·0.5/1 + 2·1/4 + 0.5·5/2) / 3 = 2/3;
#             weights A 0.5·0.5/3, C 0.5·3/6, B 2·2/12 → share = (1/12 + 1/4) / (1/12 + 1/4 + 1/3)
#   domain:   L = (0.5·5.5/3 + 2·1/4) / 2;            share = (0.5·3.5/6) / (0.5·3.5/6 + 2·2/8)
HAND_MOPD_WEIGHTED = {"token": (4.75 / 7, 1.75 / 5.75), "sequence": (2 / 3, 0.5),
                      "domain": ((2.75 / 3 + 0.5) / 2, (1.75 / 6) / (1.75 / 6 + 0.5))}


@pytest.mark.parametrize("per", sorted(HAND_MOPD_WEIGHTED))
def test_mopd_loss_domain_weight_hand_computed(per):
    """``domain_weight`` λ_d scales each domain's part of the loss after the normalisation:
    the loss, the gradient (−λ c a per token, w = 1) and the domain's share, by hand."""
    lp, teacher, mask, dom = _hand_mopd_case()
    lam = np.ones(9, np.float32)
    lam[3], lam[4] = 2.0, 0.5
    f = lambda x: rl.mopd_loss(x, jnp.asarray(teacher), jnp.asarray(lp), jnp.asarray(mask),
                               normalization=per, domain_index=jnp.asarray(dom), num_domains=9,
                               domain_weight=jnp.asarray(lam))
    loss, m = f(jnp.asarray(lp))
    want_loss, want_share = HAND_MOPD_WEIGHTED[per]
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-6)
    gw = np.asarray(m["domain_grad_weight"])
    np.testing.assert_allclose(gw[4] / gw.sum(), want_share, rtol=1e-6)
    g = np.asarray(jax.grad(lambda x: f(x)[0])(jnp.asarray(lp)))
    np.testing.assert_allclose(np.abs(g).sum(), gw.sum(), rtol=1e-6)
    # against the unweighted gradient: each token's gradient times its domain's λ
    g1 = jax.grad(lambda x: rl.mopd_loss(x, jnp.asarray(teacher), jnp.asarray(lp), jnp.asarray(mask),
                                         normalization=per, domain_index=jnp.asarray(dom),
                                         num_domains=9)[0])(jnp.asarray(lp))
    np.testing.assert_allclose(g, np.asarray(g1) * lam[dom], rtol=1e-6)
    with pytest.raises(ValueError, match="domain_weight needs domain_index"):
        rl.mopd_loss(jnp.asarray(lp), jnp.asarray(teacher), jnp.asarray(lp), jnp.asarray(mask),
                     normalization=per, domain_weight=jnp.asarray(lam))


def test_mopd_domain_normalisation_micro_batches_sum_to_batch():
    """Rows split in two micro-batches, each given the whole batch's per-domain token counts:
    the two losses sum to the one-batch loss."""
    d = hand_batch()
    dom = np.broadcast_to(HAND_DOMAINS[:, None], d["mask"].shape)
    n_d = np.zeros(9, np.float32)
    np.add.at(n_d, HAND_DOMAINS, d["mask"].sum(1))
    args = lambda rows: [jnp.asarray(d[k][rows]) for k in ("lp", "teacher", "roll", "mask")]
    kw = lambda rows, **x: dict(normalization="domain", domain_index=jnp.asarray(dom[rows]),
                                num_domains=9, **x)
    full, _ = rl.mopd_loss(*args(slice(None)), **kw(slice(None)))
    parts = sum(float(rl.mopd_loss(*args(r), **kw(r, domain_tokens=jnp.asarray(n_d)))[0])
                for r in (slice(0, 3), slice(3, 6)))
    np.testing.assert_allclose(parts, float(full), rtol=RTOL, atol=ATOL)


def test_mopd_loss_bad_normalisation():
    d = hand_batch()
    a = [jnp.asarray(d[k]) for k in ("lp", "teacher", "roll", "mask")]
    with pytest.raises(ValueError, match="needs domain_index"):
        rl.mopd_loss(*a, normalization="domain")
    with pytest.raises(ValueError, match="unknown normalization 'row'"):
        rl.mopd_loss(*a, normalization="row")
    with pytest.raises(ConfigError, match="stage.loss_norm: must be one of"):
        StageConfig(objective="mopd", loss_norm="row")


def test_mopd_gradient_masked_not_clamped():
    d = hand_batch()
    g = jax.grad(lambda lp: rl.mopd_loss(lp, jnp.asarray(d["teacher"]), jnp.asarray(d["roll"]),
                                         jnp.asarray(d["mask"]))[0])(jnp.asarray(d["lp"]))
    want = np_mopd_grad(d["lp"], d["teacher"], d["roll"], d["mask"])
    np.testing.assert_allclose(g, want, rtol=RTOL, atol=ATOL)
    # outside the band: weight 0 (not clamped), yet the token still counts in |V| (np reference)
    assert d["mask"][0, 5] == 1 and float(g[0, 5]) == 0.0 and float(g[3, 4]) == 0.0


def test_mopd_packed_equals_padded_and_advantage_mixing():
    d = hand_batch()
    B, T = d["lp"].shape
    # pack rows (0, 1) and (2, 3) and (4, 5) into 3 rows of length 2T
    cat = lambda x: np.concatenate([x[0::2], x[1::2]], axis=1)
    seq = np.concatenate([np.arange(0, B, 2)[:, None].repeat(T, 1),
                          np.arange(1, B, 2)[:, None].repeat(T, 1)], axis=1)
    loss_p, _ = rl.mopd_loss(*(jnp.asarray(cat(d[k])) for k in ("lp", "teacher", "roll", "mask")),
                             seq_index=jnp.asarray(seq), num_segments=B)
    loss, _ = rl.mopd_loss(*(jnp.asarray(d[k]) for k in ("lp", "teacher", "roll", "mask")))
    np.testing.assert_allclose(loss_p, loss, rtol=RTOL, atol=ATOL)
    adv = np.linspace(-1, 1, B).astype(np.float32)
    loss_mix, _ = rl.mopd_loss(*(jnp.asarray(d[k]) for k in ("lp", "teacher", "roll", "mask")),
                               advantages=jnp.asarray(adv), advantage_coef=0.5)
    want = np_mopd(d["lp"], d["teacher"] + 0.5 * adv[:, None], d["roll"], d["mask"])
    np.testing.assert_allclose(loss_mix, want, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# SFT loss and chunked log-probs


def test_sft_loss_packed_segments():
    rng = np.random.default_rng(2)
    lp = -rng.uniform(0.1, 4, (2, 8)).astype(np.float32)
    seg = np.array([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 3, 3, 3]], np.int32)
    amask = np.array([[0, 1, 1, 1, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 0]], np.float32)
    loss, m = rl.sft_loss(jnp.asarray(lp), jnp.asarray(amask), segment_ids=jnp.asarray(seg))
    keep = np.zeros_like(amask)
    for b in range(2):
        for t in range(1, 8):
            keep[b, t] = amask[b, t] * (seg[b, t] > 0) * (seg[b, t] == seg[b, t - 1])
    np.testing.assert_allclose(loss, -(lp * keep).sum() / keep.sum(), rtol=RTOL)
    assert keep[0, 3] == 0 and keep[1, 5] == 0 and keep[0, 7] == 0  # segment starts / padding


@pytest.mark.parametrize("chunk", [37, 10, 8])
def test_chunked_logprobs_and_entropy(chunk):
    rng = np.random.default_rng(0)
    h = rng.normal(size=(2, 5, 8)).astype(np.float32)
    W = rng.normal(size=(8, 37)).astype(np.float32)
    y = rng.integers(0, 37, (2, 5))
    tau = 0.7
    lp, ent = rl.chunked_logprobs(jnp.asarray(h), jnp.asarray(W), jnp.asarray(y), temperature=tau,
                                  vocab_chunk=chunk)
    z = (h.astype(np.float64) @ W) / tau
    logz = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    ls = z - logz[..., None]
    np.testing.assert_allclose(lp, np.take_along_axis(ls, y[..., None], -1)[..., 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent, -(np.exp(ls) * ls).sum(-1), rtol=1e-5, atol=1e-5)

    def full(h, W):
        return jnp.take_along_axis(jax.nn.log_softmax(h @ W / tau, -1), jnp.asarray(y)[..., None], -1).sum()

    def chunked(h, W):
        return rl.chunked_logprobs(h, W, jnp.asarray(y), temperature=tau, vocab_chunk=chunk)[0].sum()

    g_full = jax.grad(full, argnums=(0, 1))(jnp.asarray(h), jnp.asarray(W))
    g_chunk = jax.grad(chunked, argnums=(0, 1))(jnp.asarray(h), jnp.asarray(W))
    for a, b in zip(g_chunk, g_full):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_chunked_logprobs_never_materialises_full_logits():
    """The jaxpr of value-and-grad holds no [B, T, V] fp32 array, only [B, T, chunk] blocks."""
    B, T, H, V, C = 2, 3, 4, 64, 16
    f = lambda h, W: rl.chunked_logprobs(h, W, jnp.zeros((B, T), jnp.int32), vocab_chunk=C)[0].sum()
    jaxpr = jax.make_jaxpr(jax.value_and_grad(f, argnums=(0, 1)))(jnp.ones((B, T, H)), jnp.ones((H, V)))
    shapes = set()

    def walk(jx):
        for eqn in jx.eqns:
            for v in eqn.outvars:
                shapes.add(tuple(getattr(v.aval, "shape", ())))
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (list, tuple)) else [p]):
                    if hasattr(sub, "jaxpr"):
                        walk(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
                    elif hasattr(sub, "eqns"):
                        walk(sub)

    walk(jaxpr.jaxpr)
    assert (B, T, C) in shapes
    assert not any(len(s) >= 3 and s[-1] == V and np.prod(s) >= B * T * V for s in shapes), shapes


# ---------------------------------------------------------------------------------------------
# MOPD's top-K forward-KL term (docs/mopd.md §10)


@pytest.mark.parametrize("chunk", [37, 10])
def test_chunked_topk_logprobs_and_extra_ids_match_numpy(chunk):
    """The streaming top-K (ids and log-probs, most likely first) and the log-probs of given
    ids equal numpy's full log-softmax at temperature τ, over vocabulary chunks that do not
    divide V; the extra ids' gradient equals the full log-softmax's."""
    rng = np.random.default_rng(3)
    h = rng.normal(size=(2, 5, 8)).astype(np.float32)
    W = rng.normal(size=(8, 37)).astype(np.float32)
    y = rng.integers(0, 37, (2, 5))
    ids = rng.integers(0, 37, (2, 5, 4))
    tau = 1.5
    z = (h.astype(np.float64) @ W) / tau
    ls = z - (np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1))[..., None]
    top_ids, top_lp = rl.chunked_topk_logprobs(jnp.asarray(h), jnp.asarray(W), 6, temperature=tau,
                                               vocab_chunk=chunk)
    want_ids = np.argsort(-ls, -1)[..., :6]
    np.testing.assert_array_equal(np.asarray(top_ids), want_ids)
    np.testing.assert_allclose(top_lp, np.take_along_axis(ls, want_ids, -1), rtol=1e-5, atol=1e-5)
    lp, _, extra = rl.chunked_logprobs(jnp.asarray(h), jnp.asarray(W), jnp.asarray(y),
                                       temperature=tau, vocab_chunk=chunk, extra_ids=jnp.asarray(ids))
    np.testing.assert_allclose(extra, np.take_along_axis(ls, ids, -1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lp, np.take_along_axis(ls, y[..., None], -1)[..., 0], rtol=1e-5,
                               atol=1e-5)
    cw = jnp.asarray(rng.normal(size=ids.shape).astype(np.float32))
    full = lambda W_: (jnp.take_along_axis(jax.nn.log_softmax(jnp.asarray(h) @ W_ / tau, -1),
                                           jnp.asarray(ids), -1) * cw).sum()
    chunked = lambda W_: (rl.chunked_logprobs(jnp.asarray(h), W_, jnp.asarray(y), temperature=tau,
                                              vocab_chunk=chunk, extra_ids=jnp.asarray(ids))[2]
                          * cw).sum()
    np.testing.assert_allclose(jax.grad(chunked)(jnp.asarray(W)), jax.grad(full)(jnp.asarray(W)),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"k must be in \[1, 37\]"):
        rl.chunked_topk_logprobs(jnp.asarray(h), jnp.asarray(W), 38)


def _fkl_case(rng, B=3, T=6, K=5, V=9):
    """Student logits, a teacher distribution, its top-K and a mask (row 2 half padding)."""
    z = rng.normal(size=(B, T, V)).astype(np.float32)
    tz = (2 * rng.normal(size=(B, T, V))).astype(np.float32)
    tls = tz - np.log(np.exp(tz).sum(-1, keepdims=True))
    ids = np.argsort(-tls, -1)[..., :K]
    mask = np.ones((B, T), np.float32)
    mask[:, 0] = 0
    mask[2, 3:] = 0
    return z, tls, ids, np.take_along_axis(tls, ids, -1), mask


@pytest.mark.parametrize("per", ["sequence", "token"])
def test_mopd_forward_kl_term_matches_numpy_and_its_gradient(per):
    """L(β) − L(0) = β Σ mask c_t Σ_k q_k (log q_k − log p_k) (numpy, loops), and its gradient
    on the student's logits is β c_t (Q_K p − q) / τ: large where the student is sure of a
    token the teacher rejects, where the sampled-token term's gradient vanishes."""
    rng = np.random.default_rng(4)
    z, tls, ids, tlp_k, mask = _fkl_case(rng)
    tau, beta = 1.5, 0.7
    B, T, V = z.shape
    y = rng.integers(0, V, (B, T))
    teacher = np.take_along_axis(tls, y[..., None], -1)[..., 0]

    def loss(z_, coef):
        ls = jax.nn.log_softmax(z_ / tau, -1)
        lp = jnp.take_along_axis(ls, jnp.asarray(y)[..., None], -1)[..., 0]
        slp_k = jnp.take_along_axis(ls, jnp.asarray(ids), -1)
        return rl.mopd_loss(lp, jnp.asarray(teacher), jax.lax.stop_gradient(lp), jnp.asarray(mask),
                            normalization=per, forward_kl_coef=coef,
                            teacher_topk_logp=jnp.asarray(tlp_k), student_topk_logp=slp_k)

    (l1, m1), (l0, _) = loss(jnp.asarray(z), beta), loss(jnp.asarray(z), 0.0)
    zz = z.astype(np.float64) / tau
    ls = zz - np.log(np.exp(zz).sum(-1, keepdims=True))
    c = np.zeros((B, T))
    F = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            c[b, t] = 1 / (B * mask[b].sum()) if per == "sequence" else 1 / mask.sum()
            F[b, t] = sum(np.exp(tlp_k[b, t, k]) * (tlp_k[b, t, k] - ls[b, t, ids[b, t, k]])
                          for k in range(ids.shape[-1]))
    np.testing.assert_allclose(float(l1) - float(l0), beta * (mask * c * F).sum(), rtol=1e-5)
    np.testing.assert_allclose(float(m1["forward_kl_topk"]), (F * mask).sum() / mask.sum(), rtol=1e-5)
    g1 = np.asarray(jax.grad(lambda z_: loss(z_, beta)[0])(jnp.asarray(z)))
    g0 = np.asarray(jax.grad(lambda z_: loss(z_, 0.0)[0])(jnp.asarray(z)))
    p = np.exp(ls)
    q = np.zeros_like(p)
    np.put_along_axis(q, ids, np.exp(tlp_k), -1)
    want = beta * (mask * c)[..., None] * (q.sum(-1, keepdims=True) * p - q) / tau
    np.testing.assert_allclose(g1 - g0, want, rtol=1e-4, atol=1e-7)


def test_mopd_forward_kl_moves_a_saturated_decision():
    """One decision, student p(space) = 0.999, teacher q(space) = 0.01 (q(".") = 0.98): the
    sampled-token gradient on the logits (sampled "space", advantage log q − log p) is at most
    |a| (1 − p) ≈ 0.0046 per logit, the forward-KL term's (β = 1) is (p − q) ≈ 0.98 on the
    space logit (hand-computed)."""
    V = 3  # [space, ".", other]
    p = np.array([0.999, 0.0005, 0.0005])
    q = np.array([0.01, 0.98, 0.01])
    z = jnp.asarray(np.log(p)[None, None], jnp.float32)  # [1, 1, 3]
    ids = jnp.arange(V)[None, None]
    mask = jnp.ones((1, 1))

    def loss(z_, coef):
        ls = jax.nn.log_softmax(z_, -1)
        return rl.mopd_loss(ls[..., 0], jnp.log(jnp.asarray(q[None, None, :1], jnp.float32))[..., 0],
                            jax.lax.stop_gradient(ls[..., 0]), mask, forward_kl_coef=coef,
                            teacher_topk_logp=jnp.log(jnp.asarray(q, jnp.float32))[None, None],
                            student_topk_logp=jnp.take_along_axis(ls, ids, -1))[0]

    g_sampled = np.asarray(jax.grad(lambda z_: loss(z_, 0.0))(z))[0, 0]
    g_both = np.asarray(jax.grad(lambda z_: loss(z_, 1.0))(z))[0, 0]
    a = np.log(0.01) - np.log(0.999)
    # fp32: p(space) = 0.999 is stored to ~6e-8, so 1 − p and the gradient carry ~3e-7 absolute
    np.testing.assert_allclose(g_sampled, -a * (np.eye(V)[0] - p), rtol=1e-4, atol=1e-6)
    assert np.abs(g_sampled).max() < 0.005
    np.testing.assert_allclose(g_both - g_sampled, p - q, rtol=1e-4, atol=1e-6)


def test_mopd_forward_kl_needs_both_topk_arrays_and_config_checks():
    d = hand_batch()
    a = [jnp.asarray(d[k]) for k in ("lp", "teacher", "roll", "mask")]
    with pytest.raises(ValueError, match="needs teacher_topk_logp and student_topk_logp"):
        rl.mopd_loss(*a, forward_kl_coef=1.0)
    with pytest.raises(ConfigError, match="stage.teacher_topk: stage.forward_kl_coef > 0 needs"):
        StageConfig(objective="mopd", forward_kl_coef=1.0)
    with pytest.raises(ConfigError, match="stage.forward_kl_coef: read only by objective 'mopd'"):
        StageConfig(objective="grpo", forward_kl_coef=1.0, teacher_topk=4)
    with pytest.raises(ConfigError, match="stage.teacher_topk: expected an integer >= 0"):
        StageConfig(objective="mopd", forward_kl_coef=1.0, teacher_topk=2.5)
    with pytest.raises(ValueError, match="MOPDSettings.teacher_topk"):
        rl.MOPDSettings(forward_kl_coef=1.0)
