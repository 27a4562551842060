"""The tiny NemotronH (one layer of each kernel kind: "M*E") with every kernel switched to Pallas (interpret mode on CPU) vs XLA.

Packed batch (two rows, several segments, one crossing a chunk boundary), fp32 params: logits
and the gradient of a next-token loss w.r.t. all parameters must match.
Tolerances: logits 1e-4 max-abs; gradients 1e-4 relative to each leaf's largest magnitude.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import nemotron_h as nh


@pytest.mark.integration
def test_model_with_pallas_kernels_matches_xla():
    cfg_x = nh.preset("tiny", pattern="M*E", moe_impl="xla", attention_impl="xla", ssd_impl="xla")
    cfg_p = dataclasses.replace(cfg_x, moe_impl="pallas", attention_impl="pallas", ssd_impl="pallas")
    params = jax.jit(nh.init_params, static_argnums=(0, 2))(cfg_x, jax.random.key(0), jnp.float32)
    lens = ((20, 3, 13), (36,))
    tokens = jax.random.randint(jax.random.key(1), (2, 36), 0, cfg_x.vocab_size)
    seg = jnp.asarray([np.repeat(np.arange(len(l)), l) for l in lens], jnp.int32)
    pos = jnp.asarray([np.concatenate([np.arange(n) for n in l]) for l in lens], jnp.int32)

    def loss_and_logits(p, cfg):
        logits = nh.forward(p, tokens, cfg, positions=pos, segment_ids=seg)
        lp = jax.nn.log_softmax(logits[:, :-1])
        nll = -jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)
        return jnp.mean(nll), logits

    run = jax.jit(jax.value_and_grad(loss_and_logits, has_aux=True), static_argnums=1)
    (l_x, logits_x), g_x = run(params, cfg_x)
    (l_p, logits_p), g_p = run(params, cfg_p)
    np.testing.assert_allclose(logits_p, logits_x, atol=1e-4, rtol=0)
    np.testing.assert_allclose(l_p, l_x, atol=1e-5)
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(g_p), jax.tree.leaves(g_p), jax.tree.leaves(g_x)):
        scale = max(float(jnp.abs(b).max()), 1e-6)
        assert float(jnp.abs(a - b).max()) / scale < 1e-4, jax.tree_util.keystr(path[0])
