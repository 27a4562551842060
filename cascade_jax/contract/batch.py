"""Batch formats for the RL and SFT update steps: what rollout and data produce and rl consumes.

Layout: every per-token array is ``[B, T]`` and *aligned with* ``tokens``: entry ``[b, t]``
describes token ``tokens[b, t]`` as a prediction from its prefix ``tokens[b, :t]`` (so a
log-prob at ``[b, t]`` is ``log π(tokens[b, t] | tokens[b, <t])``). Entry ``t = 0`` and the
first token of every packed segment have no prefix; their masks must be 0.

Two row layouts share the same fields:

* **padded** (default, ``seq_index is None``): one sequence per row — prompt tokens, then
  response tokens, then padding. Sequence ``n`` is row ``n``; per-sequence arrays are ``[B]``.
* **packed**: several sequences per row, separated by ``segment_ids``; ``seq_index[b, t]`` in
  ``[0, N)`` names the sequence a token belongs to (any value on padding) and per-sequence
  arrays are ``[N]``.

``segment_ids``: int32, ``>= 1`` on real tokens, ``0`` on padding; a new value starts a new
sequence (attention/SSM state does not cross it).

``RLBatch.sampling`` records the sampling contract the rollouts were drawn with
(:class:`~cascade_jax.contract.sampling.SamplingParams` without seeds): a static pytree field
(part of the tree structure, not a leaf), so the jitted steps read its temperature at trace time
and refuse a batch sampled at another temperature than theirs.

Finish reasons: SGLang's ``meta_info.finish_reason.type`` strings (:data:`FINISH_REASONS`) and
their int32 codes in ``RLBatch.finish_reason`` (:data:`FINISH_STOP` = 0, :data:`FINISH_LENGTH` = 1,
:data:`FINISH_ABORT` = 2: the positions in :data:`FINISH_REASONS`). Domain ids are those of
:mod:`cascade_jax.domains`. The helpers over these batches are in :mod:`cascade_jax.rl.batch`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax

from .sampling import SamplingParams

__all__ = ["RLBatch", "SFTBatch", "FINISH_REASONS", "FINISH_STOP", "FINISH_LENGTH", "FINISH_ABORT"]

#: SGLang's ``meta_info.finish_reason.type`` values, in the order of the ``FINISH_*`` codes.
FINISH_REASONS = ("stop", "length", "abort")

# ``finish_reason`` codes (int32).
FINISH_STOP = 0  # ended with EOS / a stop string
FINISH_LENGTH = 1  # truncated at the length limit ("overlong")
FINISH_ABORT = 2  # aborted by the engine (should not normally reach the trainer)


#: static (non-array) fields: part of the pytree structure, hashed into the jit cache key
_META_FIELDS = ("sampling",)


def _register(cls):
    fields = [f.name for f in dataclasses.fields(cls)]
    meta = [f for f in fields if f in _META_FIELDS]
    return jax.tree_util.register_dataclass(cls, data_fields=[f for f in fields if f not in meta],
                                            meta_fields=meta)


@_register
@dataclasses.dataclass(frozen=True)
class RLBatch:
    """One optimiser batch of rollouts (a pytree; every field but ``sampling`` an array or
    ``None``).

    Per token, ``[B, T]``:
      tokens        int32   prompt + response token ids (pad with any id, e.g. 0)
      positions     int32   position within the sequence (0 at its first token)
      segment_ids   int32   >= 1 on real tokens, 0 on padding
      loss_mask     float32 1.0 on response tokens that are trained on, else 0.0
      rollout_logp  float32 log π_inf(token) returned by the inference engine (0 off-mask)
      teacher_logp  float32 log π_teacher(token) for MOPD (zeros when unused)
      ref_logp      float32 log π_ref(token) for the KL term, or ``None``
      seq_index     int32   packed layout only: sequence id of each token in [0, N); ``None``
                            for the padded layout (sequence = row)
    Per token and candidate, ``[B, T, K]`` (optional; MOPD's forward-KL term):
      teacher_topk_ids  int32   the teacher's K most likely tokens at each response token's
                                position (the distribution the token was drawn from; 0 elsewhere)
      teacher_topk_logp float32 their teacher log-probs (0 elsewhere)
    Per token and MoE layer, ``[B, T, L_moe, K]`` (optional):
      routed_experts int32  routing replay (R3): the experts the rollout engine routed each
                            token to (the trainer's MoE then uses them); -1 where the engine
                            has none (padding, each sequence's last token). See
                            :func:`pack_routed_experts`.
    Per sequence, ``[N]`` (``N = B`` when padded):
      rewards       float32 scalar reward of the response
      group_ids     int32   prompt/group id (responses to the same prompt share it)
      finish_reason int32   FINISH_STOP / FINISH_LENGTH / FINISH_ABORT
      domain_ids    int32   domain id (``cascade_jax.domains.domain_id``; routes the MOPD teacher)
      policy_version int32  optional: trainer step whose weights generated the response
                            (logged as the policy lag; strictly on-policy → lag 0)
    Static (not a leaf):
      sampling      the :class:`SamplingParams` (``seed=None``) the responses were drawn with;
                    ``rollout_logp`` is ``log softmax(z / τ)[y]`` at its temperature ``τ``
                    (``log softmax(z)[y]`` when ``τ = 0``). The packers and samplers always set
                    it; ``None`` only in hand-built batches (then the step's contract applies).
    """

    tokens: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    loss_mask: jax.Array
    rollout_logp: jax.Array
    rewards: jax.Array
    group_ids: jax.Array
    finish_reason: jax.Array
    domain_ids: jax.Array
    teacher_logp: Optional[jax.Array] = None
    ref_logp: Optional[jax.Array] = None
    seq_index: Optional[jax.Array] = None
    policy_version: Optional[jax.Array] = None
    routed_experts: Optional[jax.Array] = None
    teacher_topk_ids: Optional[jax.Array] = None
    teacher_topk_logp: Optional[jax.Array] = None
    sampling: Optional[SamplingParams] = None

    @property
    def shape(self):
        return self.tokens.shape

    def replace(self, **kw) -> "RLBatch":
        return dataclasses.replace(self, **kw)


@_register
@dataclasses.dataclass(frozen=True)
class SFTBatch:
    """Packed SFT rows, all ``[B, T]``: ``tokens`` int32, ``positions`` int32 (restart at 0 in
    each segment), ``segment_ids`` int32 (>= 1 real, 0 padding), ``loss_mask`` float32 (1.0 on
    assistant tokens, aligned with ``tokens`` as in :class:`RLBatch`)."""

    tokens: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    loss_mask: jax.Array

    def replace(self, **kw) -> "SFTBatch":
        return dataclasses.replace(self, **kw)
