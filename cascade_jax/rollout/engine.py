"""The embedded JAX rollout engine: continuous batching over a fixed number of decode slots.

High level (the :class:`~cascade_jax.rollout.types.RolloutEngine` protocol)::

    eng = JaxEngine(model_cfg, params, num_slots=8, max_len=1024)
    eng.warmup()                                  # optional: compile every shape up front
    rollouts = eng.generate([Request(prompt_ids=(1, 5, 9), sampling=SamplingParams(n=4, seed=3))])
    lps = eng.score(prompts, responses)           # teacher-forced log-probs, temperature 1
    eng.update_weights(new_params, "7")           # in process; no copy when shardings match

Low level (thread-safe; what an HTTP server drives, so requests arriving at different times join
the running batch)::

    eng.start()                                   # background thread running step() in a loop
    h = eng.submit(request, on_done=callback)     # -> RequestHandle; callback(h) from the engine thread
    h.result(timeout=60)                          # -> tuple[Sample, ...] (the request's group)
    eng.abort(rid)  /  eng.abort_all()            # finish "abort" (tokens so far are kept)
    eng.pause(); eng.resume()                     # hold decoding; running samples stay in their slots
    eng.flush_cache()                             # True when idle (nothing to flush), False when busy
    eng.stop()
    # without start(): call eng.step() yourself; generate() drives step() when no thread runs.

How it works. The engine owns one batched decode cache of ``num_slots`` rows and ``max_len``
positions (``models.nemotron_h.init_cache``), the next-token logits ``[S, V]`` of every slot and,
on the host, what each slot is generating. A request with ``n`` samples becomes ``n`` jobs in a
FIFO queue. Every :meth:`step`:

1. *Admit*: free slots take queued jobs. Their prompts are right-padded to the smallest
   ``prompt_buckets`` length that fits and prefilled together (row count padded to a power of
   two, at most ``num_slots``; padding rows are dropped on insertion) with ``prefill``; each
   prompt's cache (attention K/V of the bucket's positions, Mamba conv/SSM state) and its
   next-token logits are written into its slot.
2. *Decode* up to ``steps_per_call`` tokens for all slots in one jitted ``lax.while_loop``:
   sample from the slot's logits with :func:`~cascade_jax.rollout.sampler.sample_tokens`, then
   ``decode_step`` at the slot's position; while jobs are queued the loop ends early once
   ``refill_batch`` slots (or as many as are queued) have finished, so freed slots refill
   promptly and together. Sample
   ``i`` of a request with seed ``s`` draws its ``t``-th response token with the key
   ``fold_in(key(s_i), t)``, ``s_i = sample_seed(s, i)`` (:func:`~cascade_jax.rollout.types.
   sample_seed`; ``s_0 = s``), where ``key(s)`` is the threefry key of the 64-bit seed
   (``jax.random.key(s)`` for ``s < 2**32``), so a sample never depends on its slot, on the
   other slots, or on the number of slots, and ``n`` samples equal ``n`` one-sample requests
   seeded ``s_i`` (what the HTTP client sends a server). The slot state (position, step, seed, settings, stop
   ids, budget) lives on the device; a call moves only the tokens and log-probs back.
3. *Retire* on the host: a job ends at its first stop token (kept, finish ``stop``), after
   ``max_new_tokens`` tokens (``length``) or when aborted (``abort``); tokens decoded past the
   end in the same call are dropped. Its slot is free for the next admission.

Shapes are static: one decode program per engine and one prefill program per (row bucket,
prompt bucket), so a steady workload compiles nothing after :meth:`warmup`. Stale cache state
cannot leak between requests: admission overwrites every Mamba state of the slot and the K/V of
positions ``< bucket``, and decoding writes position ``p`` before attending to it (positions
``> p`` are causally masked). The sampling log-prob of each token follows SGLang's default
(:mod:`cascade_jax.rollout.sampler`).

Long prompts and multi-turn rows (``prefill_chunk``, ``keep_sessions``): admission can also
continue a slot's cache instead of starting it empty (``model.prefill_continue``: the chunk's
K/V written at its positions and attending the cached ones, the Mamba conv window and SSM state
carried), so a prompt is prefilled in bounded chunks and a session's next turn prefills only
its appended tokens; both equal one prefill of the whole row (tests/test_rollout_chunked.py).

The per-step next-token computation lives in one place, :meth:`JaxEngine._decode_logits`, so an
alternative (e.g. a decode that replays the trainer's numerics) can be swapped in there.

On a mesh (``mesh="tensor:4,expert:2"``, the devices of one node): the parameters, the cache
(slots over the batch axes, K/V and Mamba heads over ``tensor``) and the recorded experts are
placed with ``NamedSharding``s from the rules table (:mod:`cascade_jax.sharding.rollout`), the
admission and decode programs are jitted with those in/out shardings under the mesh's
activation partitioner and MoE dispatch (expert-parallel over ``expert``), and a weight update
is ``device_put`` onto the existing shardings. Numerics equal the one-device engine up to the
order of the tensor-parallel partial sums (tests/test_rollout_mesh.py).

Weights: :meth:`update_weights` stops admitting, waits for the running samples to finish (so
every sample is generated by exactly one weight version), swaps the pytree and resumes. While
:meth:`pause`-d with samples in their slots it refuses (abort or resume first).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cascade_jax.sharding import rollout as layout
from cascade_jax.sharding.moe import make_moe_dispatch
from cascade_jax.sharding.rules import RULES, ShardingError
from cascade_jax.sharding.state import param_shardings, replicated
from cascade_jax.sharding.step import activation_partitioner
from models.nemotron_h.partitioning import use_partitioner

from .sampler import sample_tokens
from .scoring import score_logprobs
from .types import Request, RolloutError, Rollouts, Sample, sample_seed

__all__ = ["JaxEngine", "RequestHandle", "check_version_order", "default_prompt_buckets",
           "scatter_admitted"]

_SEED_MAX = 2 ** 64


def default_prompt_buckets(max_len: int, smallest: int = 16) -> tuple:
    """Powers of two from ``smallest`` up to (and including) ``max_len``."""
    out, b = [], smallest
    while b < max_len:
        out.append(b)
        b *= 2
    out.append(max_len)
    return tuple(out)


def check_version_order(old: str, new: str) -> None:
    """The weight-version rule (see :meth:`RolloutEngine.update_weights`): ``new`` must differ
    from ``old``, and when both are decimal integers ``new`` must be larger. Raises
    :class:`RolloutError` naming both versions otherwise."""
    if not isinstance(new, str) or not new:
        raise RolloutError(f"weight version: must be a non-empty string, got {new!r}")
    if new == old:
        raise RolloutError(f"weight version {new!r}: unchanged (the engine already serves it)")
    if old.isdigit() and new.isdigit() and int(new) < int(old):
        raise RolloutError(f"weight version {new!r}: not after the current version {old!r}")


def _delete(arrays) -> int:
    """Free the device buffers of ``arrays`` now; their total bytes."""
    n = 0
    for x in arrays:
        n += int(x.nbytes)
        x.delete()
    return n


def _seed_key(seed_hi, seed_lo):
    """Threefry key of the 64-bit seed ``hi · 2^32 + lo`` (uint32 halves)."""
    return jax.random.wrap_key_data(jnp.stack([seed_hi, seed_lo]).astype(jnp.uint32))


def scatter_admitted(cache, logits, slots_state, fresh, next_logits, values, slots, rx=None):
    """Write admitted rows into their slots -> ``(cache, logits, slot state)``: row ``r`` of a
    prefill of ``Pb`` positions goes to slot ``slots[r]`` (an out-of-range slot drops the row).
    ``fresh`` is the prefill's cache (per layer: ``k``/``v`` ``[nb, Pb, ...]`` written at
    positions ``[0, Pb)``, Mamba ``conv``/``ssm`` states replaced whole), ``next_logits
    [nb, V]`` the rows' next-token distribution (stored as float32), ``values`` the new slot
    state (one ``[nb, ...]`` entry per key of ``slots_state`` other than ``rx``), ``rx [nb, Pb,
    L_moe, K]`` the prefill's routed experts (recorded when the state has ``rx``; positions
    ``>= Pb`` reset to -1). The one admission scatter of every engine mode."""
    out = []
    for layer, new in zip(cache, fresh):
        upd = {}
        for name, buf in layer.items():
            val = new[name].astype(buf.dtype)
            upd[name] = (buf.at[slots, :val.shape[1]].set(val, mode="drop") if name in ("k", "v")
                         else buf.at[slots].set(val, mode="drop"))
        out.append(upd)
    logits = logits.at[slots].set(next_logits.astype(jnp.float32), mode="drop")
    values = dict(values)
    if "rx" in slots_state:
        max_len = slots_state["rx"].shape[1]
        values["rx"] = jnp.concatenate(
            [rx, jnp.full((rx.shape[0], max_len - rx.shape[1]) + rx.shape[2:], -1, jnp.int32)], 1)
    slots_state = {k: v.at[slots].set(values[k].astype(v.dtype), mode="drop")
                   for k, v in slots_state.items()}
    return out, logits, slots_state


class RequestHandle:
    """One submitted request: its ``n`` samples fill in as they finish.

    ``result(timeout)`` blocks and returns the group ``tuple[Sample, ...]`` (sample order =
    sample index) or raises :class:`RolloutError` if the engine failed. ``done()`` polls."""

    def __init__(self, request: Request, rid: str, on_done: Optional[Callable]):
        self.request = request
        self.rid = rid
        self.samples: list = [None] * request.sampling.n
        self.error: Optional[BaseException] = None
        self._left = request.sampling.n
        self.stop = frozenset(int(t) for t in request.sampling.stop_token_ids)
        self._event = threading.Event()
        self._on_done = on_done

    def done(self) -> bool:
        return self._event.is_set()

    def result(self, timeout: Optional[float] = None) -> tuple:
        if not self._event.wait(timeout):
            raise RolloutError(f"request {self.rid!r}: not finished within {timeout} s")
        if self.error is not None:
            raise RolloutError(f"request {self.rid!r} failed: {self.error}") from self.error
        return tuple(self.samples)

    def _finish_one(self, index: int, sample: Sample) -> bool:
        self.samples[index] = sample
        self._left -= 1
        return self._left == 0

    def _complete(self, error: Optional[BaseException] = None):
        self.error = error
        self._event.set()
        if self._on_done is not None:
            self._on_done(self)


@dataclasses.dataclass
class _Job:
    handle: RequestHandle
    index: int  # sample index within the request
    seed: int  # the sample's own seed, sample_seed(request seed, index)
    version: str = ""
    session: object = None  # keep the slot's cache under this key when the job finishes
    start: int = 0  # prompt tokens already in the slot's cache (a continued session)
    tokens: list = dataclasses.field(default_factory=list)
    logps: list = dataclasses.field(default_factory=list)

    @property
    def sp(self):
        return self.handle.request.sampling

    @property
    def stop(self):
        return self.handle.stop


class JaxEngine:
    """Continuous-batching generation from a NemotronH-style model in this process (module doc).

    model_cfg        the model's config (static under jit)
    params           the policy's parameter pytree (used as given; its dtype is the cache dtype)
    num_slots        S, sequences decoded together
    max_len          cache positions per slot: ``len(prompt) + max_new_tokens <= max_len``
    prompt_buckets   allowed padded prompt lengths (default powers of two from 16 to max_len)
    prefill_sizes    allowed admission row counts (default powers of two up to num_slots)
    steps_per_call   most tokens decoded per jitted call (host work amortised over them)
    refill_batch     a call returns early once this many slots (or as many as jobs are
                     queued, if fewer) have finished in it, so they are refilled together
                     (default num_slots // 4, at least 1)
    weight_version   label of ``params``
    seed             seeds requests that carry none (engine-local random stream)
    overlap          dispatch the next decode call before reading the last one, so host work
                     overlaps device work (a freed slot is then refilled one call later)
    max_stop_tokens  most stop token ids per request
    return_routed_experts  each sample carries ``routed_experts [P + R - 1, L_moe, K]``: the
                     experts prefill and decode routed every fed token to in every MoE layer
                     (SGLang's layout; kept on the device per slot, ``[S, max_len, L_moe, K]``)
    model            module with ``prefill`` / ``decode_step`` / ``init_cache`` /
                     ``hidden_states`` (default ``models.nemotron_h``)
    mesh             None (one device, as given), or the engine's mesh over the devices of one
                     node: a ``jax.sharding.Mesh``, a ``MeshConfig`` or its text
                     ``"tensor:4,expert:2"`` (:func:`cascade_jax.sharding.rollout.engine_mesh`).
                     Parameters, caches and slot state are placed with ``NamedSharding``s from the
                     rules table (:mod:`cascade_jax.sharding.rollout`), the prefill and decode
                     programs are jitted with them and traced under the mesh's activation
                     partitioner and MoE dispatch (expert-parallel with an ``expert`` axis);
                     ``num_slots`` and every ``prefill_sizes`` entry must be multiples of the
                     slots' split (default prefill sizes: its powers-of-two multiples)
    rules            the rules table (default :data:`cascade_jax.sharding.RULES`)
    a2a              the expert-parallel token exchange (``mesh.a2a``: auto | ragged | padded)
    prefill_chunk    None (default: a prompt is prefilled in one call), or the most prompt tokens
                     per row per prefill call: a longer prompt is admitted in chunks, the first
                     by the admission program and each next one by the continuation program
                     (``model.prefill_continue`` from the slot's cache at its position), so
                     prefill temporaries are bounded by the chunk, not the prompt; prompts may
                     then exceed the largest prompt bucket (up to ``max_len``). Same tokens and
                     log-probs as unchunked (tests/test_rollout_chunked.py)
    keep_sessions    multi-turn continuation: a one-sample request submitted with
                     ``session=key`` keeps its slot's cache when it finishes (stop / length);
                     the next request with that key whose prompt extends the kept row
                     (prompt + response) prefills only the appended tokens from the slot's
                     position. Finished rows then stop advancing their Mamba state and position
                     in the decode loop (frozen at the row's end). A kept slot is given up
                     (oldest first) when a queued job finds no free slot, or on a prompt that
                     does not extend it / another weight version (the request is then
                     prefilled whole)
    """

    def __init__(self, model_cfg, params, *, num_slots: int = 8, max_len: int = 2048,
                 prompt_buckets: Optional[Sequence[int]] = None,
                 prefill_sizes: Optional[Sequence[int]] = None, steps_per_call: int = 16,
                 weight_version: str = "0", seed: int = 0, overlap: bool = False,
                 max_stop_tokens: int = 8, refill_batch: Optional[int] = None, model=None,
                 return_routed_experts: bool = False, mesh=None, rules=None, a2a: str = "auto",
                 prefill_chunk: Optional[int] = None, keep_sessions: bool = False):
        if model is None:
            from models import nemotron_h as model
        if num_slots < 1:
            raise ValueError(f"num_slots: must be >= 1, got {num_slots}")
        self.rules = RULES if rules is None else rules
        if mesh is not None:  # ShardingError (a ValueError) naming the field
            mesh = layout.engine_mesh(mesh)
        self.mesh, self._a2a = mesh, a2a
        split = 1 if mesh is None else layout.batch_split(mesh, self.rules)
        if num_slots % split:
            raise ShardingError(f"num_slots: {num_slots} slots cannot be split over the mesh's "
                                f"batch axes ({split} ways); use a multiple of {split}")
        if mesh is not None and not prefill_sizes:
            prefill_sizes = [split << i for i in range((num_slots // split).bit_length())
                             if (split << i) <= num_slots]
        elif prefill_sizes:
            odd = [int(z) for z in prefill_sizes if int(z) % split]
            if odd:
                raise ShardingError(f"prefill_sizes: {odd[0]} rows cannot be split over the mesh's "
                                    f"batch axes ({split} ways); use multiples of {split}")
        if steps_per_call < 1:
            raise ValueError(f"steps_per_call: must be >= 1, got {steps_per_call}")
        buckets = tuple(sorted(set(int(b) for b in (prompt_buckets or default_prompt_buckets(max_len)))))
        if buckets[0] < 1 or buckets[-1] > max_len:
            raise ValueError(f"prompt_buckets: must lie in [1, max_len={max_len}], got {buckets}")
        sizes = tuple(sorted(set(int(s) for s in (prefill_sizes or
                                                   [1 << i for i in range(num_slots.bit_length())]))))
        if sizes[0] < 1 or sizes[-1] > num_slots:
            raise ValueError(f"prefill_sizes: must lie in [1, num_slots={num_slots}], got {sizes}")
        if prefill_chunk is not None:
            if not 1 <= int(prefill_chunk) <= buckets[-1]:
                raise ValueError(f"prefill_chunk: must lie in [1, largest prompt bucket "
                                 f"{buckets[-1]}], got {prefill_chunk}")
            if type(self)._admit_impl is not JaxEngine._admit_impl:
                raise ValueError(f"prefill_chunk: not supported by {type(self).__name__} (its "
                                 "admission replaces the prefill); leave it unset")
            prefill_chunk = int(prefill_chunk)
        self.prefill_chunk = prefill_chunk
        self.keep_sessions = bool(keep_sessions)
        if self.keep_sessions and type(self)._admit_impl is not JaxEngine._admit_impl:
            raise ValueError(f"keep_sessions: not supported by {type(self).__name__}; leave it unset")
        self._held: dict = {}  # session -> (slot, the row's tokens, weight version), oldest first
        self._held_slot: dict = {}  # slot -> session
        self.model_cfg = model_cfg
        self.model = model
        self.num_slots = S = int(num_slots)
        self.max_len = int(max_len)
        self.prompt_buckets = buckets
        self.prefill_sizes = sizes
        self.steps_per_call = int(steps_per_call)
        self.max_stop_tokens = int(max_stop_tokens)
        self.refill_batch = max(1, num_slots // 4) if refill_batch is None else int(refill_batch)
        if self.refill_batch < 1:
            raise ValueError(f"refill_batch: must be >= 1, got {refill_batch}")
        self.vocab_size = int(model_cfg.vocab_size)
        self._params = params
        self._version = str(weight_version)
        self._seed_rng = np.random.default_rng(seed)
        self._rid_counter = itertools.count()

        self._cache_dtype = params["embed"].dtype
        self._released: set = set()  # memory tags freed by release_memory
        self._host_params = None
        self._param_sh = None if mesh is None else param_shardings(model_cfg, mesh, self.rules)
        if mesh is not None:  # each device receives only its shards (host or other-mesh input)
            self._params = jax.tree.map(lambda x, sh: jax.device_put(x, sh), params, self._param_sh)
        self._cache = self._new_cache()
        self._logits = self._place(jnp.zeros((S, self.vocab_size), jnp.float32))
        # host-side slot state
        self._jobs: list = [None] * S
        # device-side slot state (written by admission, advanced by decoding): position of
        # the next token, tokens decoded, seed halves, sample index, sampling settings, budget
        self._slots = {"pos": jnp.zeros(S, jnp.int32), "step": jnp.zeros(S, jnp.int32),
                       "seed": jnp.zeros((S, 2), jnp.uint32),
                       "temp": jnp.zeros(S, jnp.float32), "top_p": jnp.ones(S, jnp.float32),
                       "top_k": jnp.full(S, -1, jnp.int32), "budget": jnp.zeros(S, jnp.int32),
                       "stops": jnp.full((S, self.max_stop_tokens), -1, jnp.int32),
                       "done": jnp.ones(S, bool)}
        self.return_routed_experts = bool(return_routed_experts)
        if self.return_routed_experts:  # experts of every fed position: [S, max_len, L_moe, K]
            n_moe = sum(k == "E" for k in model_cfg.pattern)
            self._rx_shape = (S, self.max_len, n_moe, model_cfg.num_experts_per_tok)
            self._slots["rx"] = jnp.full(self._rx_shape, -1, jnp.int32)
        self._slots_sh = None if mesh is None else layout.slot_shardings(self._slots, mesh, self.rules)
        if mesh is not None:
            self._slots = jax.device_put(self._slots, self._slots_sh)

        self._queue: collections.deque = collections.deque()
        self._handles: dict = {}  # rid -> handle (in flight)
        self._lock = threading.RLock()  # host state
        self._step_lock = threading.Lock()  # one step at a time (device state)
        self._cond = threading.Condition(self._lock)
        self._paused = False
        self._admitting = True
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self.overlap = bool(overlap)
        self._inflight = None  # (tokens, logp, active) of the last decode call, unread

        self._admit_fn, self._decode_fn = self._programs()
        self._extend_fn = None  # the continuation program, built on first use

    # ------------------------------------------------------------------------------------------
    # placement on the mesh

    def _place(self, x, sharding=None):
        """``x`` on ``sharding`` (default replicated) when the engine has a mesh, else as is."""
        if self.mesh is None:
            return x
        return jax.device_put(x, replicated(self.mesh) if sharding is None else sharding)

    def _new_cache(self):
        """An empty decode cache (``model.init_cache``), created directly in its shards."""
        make = lambda: self.model.init_cache(self.model_cfg, self.num_slots, self.max_len,
                                             dtype=self._cache_dtype)
        if self.mesh is None:
            return make()
        shardings = layout.cache_shardings(jax.eval_shape(make), self.mesh, self.rules)
        return jax.jit(make, out_shardings=shardings)()

    def param_shardings(self):
        """The parameters' shardings (pytree like the params), or None without a mesh: what a
        weight load should place each leaf on (``load_checkpoint(..., sharding=...)``)."""
        return self._param_sh

    def _programs(self):
        """The jitted admission and decode programs. With a mesh: in/out shardings of the
        params, cache, logits and slot state fixed (admitted rows split like the slots, the
        decode's ``refill`` replicated), cache, logits and
        slot state donated, and the trace run under the mesh's activation partitioner and MoE
        dispatch (the model's ``constrain`` calls and expert-parallel / token-local MoE)."""
        if self.mesh is None:
            return (jax.jit(self._admit_impl, donate_argnums=(1, 2, 3)),
                    jax.jit(self._decode_impl, donate_argnums=(1, 2, 3)))
        partitioner = activation_partitioner(self.mesh, self.rules)
        dispatch = make_moe_dispatch(self.mesh, self.rules, a2a=self._a2a)

        def under_mesh(fn):
            def traced(*args):
                with use_partitioner(partitioner, dispatch):
                    return fn(*args)
            return traced

        rep = replicated(self.mesh)
        rows = layout.rows_sharding(self.prefill_sizes[0], self.mesh, self.rules)  # as the slots
        c_sh = layout.cache_shardings(self._cache, self.mesh, self.rules)
        state = (self._param_sh, c_sh, rep, self._slots_sh)
        admit = jax.jit(under_mesh(self._admit_impl), in_shardings=state + (rows,) * 4,
                        out_shardings=state[1:], donate_argnums=(1, 2, 3))
        decode = jax.jit(under_mesh(self._decode_impl), in_shardings=state + (rep,),
                         out_shardings=state[1:] + (rep,) * 3, donate_argnums=(1, 2, 3))
        return admit, decode

    def _extend_program(self):
        """The jitted continuation program (:meth:`_extend_impl`), with the admission program's
        shardings on a mesh (rows split like the slots; cache, logits, slot state donated)."""
        if self.mesh is None:
            return jax.jit(self._extend_impl, donate_argnums=(1, 2, 3))
        partitioner = activation_partitioner(self.mesh, self.rules)
        dispatch = make_moe_dispatch(self.mesh, self.rules, a2a=self._a2a)

        def traced(*args):
            with use_partitioner(partitioner, dispatch):
                return self._extend_impl(*args)

        rows = layout.rows_sharding(self.prefill_sizes[0], self.mesh, self.rules)
        c_sh = layout.cache_shardings(self._cache, self.mesh, self.rules)
        state = (self._param_sh, c_sh, replicated(self.mesh), self._slots_sh)
        return jax.jit(traced, in_shardings=state + (rows,) * 4, out_shardings=state[1:],
                       donate_argnums=(1, 2, 3))

    # ------------------------------------------------------------------------------------------
    # jitted programs

    def _admit_impl(self, params, cache, logits, slots_state, tokens, ints, floats, stops):
        """Prefill ``tokens [nb, Pb]`` and write row ``r`` into slot ``ints[r, 1]`` (an
        out-of-range slot drops the row). ``ints [nb, 6]`` int32: length, slot, top_k, budget
        (max_new_tokens), the sample's seed high and low halves (uint32 bits); ``floats
        [nb, 2]``: temperature, top_p; ``stops [nb, max_stop_tokens]`` (-1 padded)."""
        Pb = tokens.shape[1]
        lengths, slots = ints[:, 0], ints[:, 1]
        pre = self.model.prefill(params, tokens, self.model_cfg, lengths=lengths, max_len=Pb,
                                 last_only=True, return_routed_experts=self.return_routed_experts)
        return scatter_admitted(cache, logits, slots_state, pre[1], pre[0],
                                self._admitted_state(ints, floats, stops), slots,
                                pre[2] if self.return_routed_experts else None)

    @staticmethod
    def _admitted_state(ints, floats, stops) -> dict:
        """The slot state of admitted rows (``ints`` / ``floats`` / ``stops`` as in
        :meth:`_admit_impl`): position = prompt length, no tokens decoded, the sample's seed,
        sampling settings, budget and stop ids, not done."""
        lengths = ints[:, 0]
        return {"pos": lengths, "step": jnp.zeros_like(lengths),
                "seed": jax.lax.bitcast_convert_type(ints[:, 4:6], jnp.uint32),
                "temp": floats[:, 0], "top_p": floats[:, 1], "top_k": ints[:, 2],
                "budget": ints[:, 3], "stops": stops, "done": jnp.zeros(lengths.shape, bool)}

    def _extend_impl(self, params, cache, logits, slots_state, tokens, ints, floats, stops):
        """Continue slot ``ints[r, 2]``'s prefill with the chunk ``tokens [nb, Cb]`` (``ints[r, 1]``
        valid) at positions ``ints[r, 0] + [0, Cb)`` (``model.prefill_continue`` on the slot's
        cache rows); an out-of-range slot drops the row. Writes the rows' cache, next-token
        logits, position (start + length) and, with ``return_routed_experts``, the chunk's
        experts (-1 at padding). Rows with ``ints[r, 7] = 1`` (a continued session's first
        chunk) also get a new sample's settings as in :meth:`_admit_impl`: top_k, budget, seed
        halves ``ints[r, 3:7]``, temperature / top_p ``floats [nb, 2]``, ``stops``."""
        starts, lengths, slots = ints[:, 0], ints[:, 1], ints[:, 2]
        rows = jnp.minimum(slots, self.num_slots - 1)
        mine = [{name: buf[rows] for name, buf in layer.items()} for layer in cache]
        pre = self.model.prefill_continue(params, mine, tokens, starts, self.model_cfg,
                                          lengths=lengths, last_only=True,
                                          return_routed_experts=self.return_routed_experts)
        last, new = pre[:2]
        out = [{name: buf.at[slots].set(fresh[name].astype(buf.dtype), mode="drop")
                for name, buf in layer.items()} for layer, fresh in zip(cache, new)]
        logits = logits.at[slots].set(last.astype(jnp.float32), mode="drop")
        st = dict(slots_state)
        st["pos"] = st["pos"].at[slots].set(starts + lengths, mode="drop")
        fresh = jnp.where(ints[:, 7] == 1, slots, self.num_slots)  # others: dropped
        values = {"step": jnp.zeros_like(lengths), "done": jnp.zeros(lengths.shape, bool),
                  "seed": jax.lax.bitcast_convert_type(ints[:, 5:7], jnp.uint32),
                  "temp": floats[:, 0], "top_p": floats[:, 1], "top_k": ints[:, 3],
                  "budget": ints[:, 4], "stops": stops}
        for k, v in values.items():
            st[k] = st[k].at[fresh].set(v.astype(st[k].dtype), mode="drop")
        if self.return_routed_experts:
            cb = tokens.shape[1]
            valid = jnp.arange(cb)[None, :] < lengths[:, None]
            rx = jnp.where(valid[..., None, None], pre[2], -1)
            cols = starts[:, None] + jnp.arange(cb, dtype=jnp.int32)[None]
            st["rx"] = st["rx"].at[slots[:, None], cols].set(rx, mode="drop")
        return out, logits, st

    def _decode_logits(self, params, cache, tokens, positions, st=None):
        """Next-token logits ``[S, V]`` after feeding ``tokens [S]`` at ``positions [S]``, and the
        new cache (and the experts used, ``[S, L_moe, K]``, with ``return_routed_experts``). The
        one place the engine computes next-token logits (``st``: the slot state, for
        alternatives that need the slots' settings)."""
        return self.model.decode_step(params, cache, tokens, positions, self.model_cfg,
                                      return_routed_experts=self.return_routed_experts)

    def _record_experts(self, rx, experts, positions, going):
        """The recorded experts ``rx [S, max_len, L_moe, K]`` after a decode step: those of the
        token fed at ``positions [S]`` (``experts [S, L_moe, K]``) written at that position.
        ``going [S]``: the rows that continue after this step (for modes that record more)."""
        return rx.at[jnp.arange(rx.shape[0]), positions].set(experts)

    def _sample(self, z, keys, live, st):
        """``(ids [S], logp [S])`` drawn from the slots' next-token logits ``z [S, V]`` with their
        settings (idle rows greedily). The one place the engine samples."""
        return sample_tokens(z, keys, jnp.where(live, st["temp"], 0.0),
                             jnp.where(live, st["top_p"], 1.0), jnp.where(live, st["top_k"], -1))

    def _decode_impl(self, params, cache, logits, st, refill):
        """Up to ``K = steps_per_call`` tokens per slot -> ``(cache, logits, slot state,
        tokens [K, S], logp [K, S], n)``: the first ``n`` rows are valid. Stops after the step
        in which the ``refill``-th slot of this call finishes (stop token or budget); ``refill``
        int32, 0 = never early (no job is waiting).
        Finished and idle rows decode greedily, untruncated, and are ignored."""
        base = jax.vmap(lambda sd: _seed_key(sd[0], sd[1]))(st["seed"])  # the samples' own keys
        last = self.max_len - 1
        K, S = self.steps_per_call, self.num_slots

        def cond(c):
            return (c[0] < K) & ((refill <= 0) | (c[1] < refill))

        def body(c):
            i, n_ended, cache, z, pos, step, done, toks, lps, rx = c
            live = ~done
            keys = jax.vmap(jax.random.fold_in)(base, step)
            tok, lp = self._sample(z, keys, live, st)
            out = self._decode_logits(params, cache, tok, jnp.minimum(pos, last), st)
            z, new_cache = out[:2]
            hit = jnp.any(tok[:, None] == st["stops"], axis=1)
            ended = live & (hit | (step + 1 >= st["budget"]))
            if self.keep_sessions:  # finished rows keep their Mamba state (position-free)
                new_cache = [{k: (jnp.where(live.reshape((-1,) + (1,) * (v.ndim - 1)), v, layer[k])
                                  if k in ("conv", "ssm") else v) for k, v in new.items()}
                             for layer, new in zip(cache, new_cache)]
            cache = new_cache
            if rx is not None:
                rx = self._record_experts(rx, out[2], jnp.minimum(pos, last), live & ~ended)
            toks = jax.lax.dynamic_update_index_in_dim(toks, tok, i, 0)
            lps = jax.lax.dynamic_update_index_in_dim(lps, lp, i, 0)
            pos = jnp.where(live, pos + 1, pos) if self.keep_sessions else pos + 1
            return (i + 1, n_ended + ended.sum(dtype=jnp.int32), cache, z, pos, step + 1,
                    done | ended, toks, lps, rx)

        init = (jnp.int32(0), jnp.int32(0), cache, logits, st["pos"], st["step"], st["done"],
                jnp.zeros((K, S), jnp.int32), jnp.zeros((K, S), jnp.float32), st.get("rx"))
        n, _, cache, logits, pos, step, done, toks, lps, rx = jax.lax.while_loop(cond, body, init)
        new = {**st, "pos": pos, "step": step, "done": done}
        if rx is not None:
            new["rx"] = rx
        return cache, logits, new, toks, lps, n

    # ------------------------------------------------------------------------------------------
    # low-level API (thread-safe)

    def submit(self, request: Request, on_done: Optional[Callable] = None, *,
               session=None) -> RequestHandle:
        """Queue ``request`` (``n`` samples). Validates it first: ``ValueError`` naming the bad
        field. ``on_done(handle)`` runs on the thread that finished it (keep it short).
        ``session`` (hashable, with ``keep_sessions``): keep / continue that session's slot
        cache (class doc)."""
        sp = request.sampling
        if session is not None and not (self.keep_sessions and sp.n == 1):
            raise ValueError("session: needs an engine with keep_sessions=True and a request with n = 1")
        prompt = [int(t) for t in request.prompt_ids]
        if not prompt:
            raise ValueError("prompt_ids: empty prompt")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt_ids: token id {bad[0]} outside [0, {self.vocab_size})")
        if self.prefill_chunk is None and len(prompt) > self.prompt_buckets[-1]:
            raise ValueError(f"prompt_ids: length {len(prompt)} exceeds the largest prompt "
                             f"bucket {self.prompt_buckets[-1]}")
        if len(prompt) + sp.max_new_tokens > self.max_len:
            raise ValueError(f"max_new_tokens: prompt length {len(prompt)} + max_new_tokens "
                             f"{sp.max_new_tokens} exceeds the engine's max_len {self.max_len}")
        if len(sp.stop_token_ids) > self.max_stop_tokens:
            raise ValueError(f"stop_token_ids: {len(sp.stop_token_ids)} ids, the engine takes at "
                             f"most max_stop_tokens={self.max_stop_tokens}")
        if sp.seed is not None and not 0 <= int(sp.seed) < _SEED_MAX:
            raise ValueError(f"seed: must be in [0, 2**64), got {sp.seed}")
        with self._cond:
            if self._error is not None:
                raise RolloutError(f"engine failed earlier: {self._error}")
            if self._released:
                raise RolloutError(f"device memory is released ({sorted(self._released)}); resume it first")
            rid = request.rid if request.rid is not None else f"jax-{next(self._rid_counter)}"
            if rid in self._handles:
                raise ValueError(f"rid: {rid!r} is already in flight")
            handle = RequestHandle(request, rid, on_done)
            seed = int(sp.seed) if sp.seed is not None else int(self._seed_rng.integers(0, 2 ** 63))
            self._handles[rid] = handle
            if sp.max_new_tokens == 0:
                done_now = True
                for i in range(sp.n):
                    done_now = handle._finish_one(i, self._sample_of(_Job(handle, i, seed, self._version), "length"))
            else:
                done_now = False
                for i in range(sp.n):
                    self._queue.append(_Job(handle, i, sample_seed(seed, i), session=session))
            self._cond.notify_all()
        if done_now:
            self._retire_handle(handle)
        return handle

    def abort(self, rid: str) -> bool:
        """Abort every sample of request ``rid`` now: queued ones finish with an empty response,
        running ones with the tokens decoded so far (their slots are free); finish ``abort``.
        Returns False when ``rid`` is not in flight."""
        with self._cond:
            if rid not in self._handles:
                return False
            self._abort_where(lambda j: j.handle.rid == rid)
        return True

    def abort_all(self) -> int:
        """Abort every queued and running sample; returns how many."""
        with self._cond:
            return self._abort_where(lambda j: True)

    def _abort_where(self, pred) -> int:
        n = 0
        finished = []
        for job in [j for j in self._queue if pred(j)]:
            self._queue.remove(job)
            job.version = self._version
            if job.handle._finish_one(job.index, self._sample_of(job, "abort")):
                finished.append(job.handle)
            n += 1
        for s, job in enumerate(self._jobs):
            if job is not None and pred(job):
                self._free_slot(s)
                if job.handle._finish_one(job.index, self._sample_of(job, "abort")):
                    finished.append(job.handle)
                n += 1
        self._cond.notify_all()
        for h in finished:
            self._retire_handle(h)
        return n

    def pause(self) -> None:
        """Stop decoding and admitting; running samples keep their slots (SGLang's in-place pause)."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        """Undo :meth:`pause`."""
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def flush_cache(self) -> bool:
        """Drops the slot caches kept for sessions (``keep_sessions``; the engine keeps no other
        cross-request cache) when idle; like SGLang's ``/flush_cache`` it reports False (and
        drops nothing) while anything is queued or running."""
        with self._cond:
            idle = self.num_running() == 0 and not self._queue
            if idle:
                self._held.clear()
                self._held_slot.clear()
            return idle

    def used_tokens(self) -> int:
        """Cache positions held by running samples (prompt + tokens decoded so far)."""
        with self._cond:
            return sum(len(j.handle.request.prompt_ids) + len(j.tokens) for j in self._jobs if j is not None)

    def num_running(self) -> int:
        return sum(j is not None for j in self._jobs)

    def num_queued(self) -> int:
        return len(self._queue)

    def is_paused(self) -> bool:
        return self._paused

    def step(self) -> int:
        """One scheduler iteration: admit queued jobs into free slots,
        decode ``steps_per_call`` tokens, retire finished jobs. Returns the number of running
        samples afterwards. Does nothing while paused."""
        with self._step_lock:
            try:
                return self._step_locked()
            except BaseException as e:  # the device state is unknown now: fail everything
                self._fail(e)
                raise

    def _step_locked(self) -> int:
        with self._cond:
            paused = self._paused
            admit = []
            if self._admitting and not paused:
                free = [s for s in range(self.num_slots)
                        if self._jobs[s] is None and s not in self._held_slot]
                while self._queue:
                    job = self._queue[0]
                    s = self._resume_slot(job, free)
                    if s is None:
                        if not free and self._held:  # give up the oldest kept cache
                            free.append(self._drop_held(next(iter(self._held))))
                        if not free:
                            break
                        s = free.pop(0)
                    self._queue.popleft()
                    job.version = self._version
                    self._jobs[s] = job
                    admit.append(s)
            active = [(s, j) for s, j in enumerate(self._jobs) if j is not None]
            params = self._params
        if admit:
            self._admit(params, admit)
        launched = None
        if active and not paused:  # dispatch (asynchronously) before reading the last call
            with self._cond:
                refill = min(len(self._queue), self.refill_batch) if self._admitting else 0
            self._cache, self._logits, self._slots, toks, lps, n = self._decode_fn(
                params, self._cache, self._logits, self._slots, np.int32(refill))
            launched = (toks, lps, n, active)
        if self.overlap:
            previous, self._inflight = self._inflight, launched
        else:
            previous = launched
        if previous is not None:
            self._retire(*previous)
        with self._cond:
            return self.num_running()

    def _drop_held(self, session) -> int:
        """Forget the cache kept under ``session``; returns its (now free) slot."""
        s = self._held.pop(session)[0]
        del self._held_slot[s]
        return s

    def _resume_slot(self, job: _Job, free: list):
        """The slot kept under ``job.session`` when the job's prompt extends its row (same
        weight version): sets ``job.start``; otherwise None (a kept slot that does not fit is
        freed into ``free``)."""
        if job.session is None or job.session not in self._held:
            return None
        s, row, version = self._held[job.session]
        self._drop_held(job.session)
        prompt = job.handle.request.prompt_ids
        if version == self._version and len(row) < len(prompt) and list(prompt[:len(row)]) == row:
            job.start = len(row)
            return s
        free.append(s)
        return None

    def _retire(self, toks, lps, n, active):
        """Read one decode call's ``tokens, logp [K, S]`` (first ``n`` rows valid) and finish
        the jobs they end."""
        n = int(n)
        toks, lps = np.asarray(toks)[:n].T.tolist(), np.asarray(lps)[:n].T.tolist()  # [S][n]
        finished = []
        with self._cond:
            for s, job in active:
                if self._jobs[s] is not job:  # finished or aborted since this call started
                    continue
                reason = None
                row, lrow = toks[s], lps[s]
                room = job.sp.max_new_tokens - len(job.tokens)
                take = min(len(row), room)
                for k in range(take):
                    if row[k] in job.stop:
                        take, reason = k + 1, "stop"
                        break
                job.tokens.extend(row[:take])
                job.logps.extend(lrow[:take])
                if reason is None and take == room:
                    reason = "length"
                if reason is not None:
                    self._free_slot(s)
                    if job.session is not None and self.keep_sessions:
                        if job.session in self._held:  # a newer row replaces an older one
                            self._drop_held(job.session)
                        row = [int(t) for t in job.handle.request.prompt_ids] + job.tokens
                        self._held[job.session] = (s, row, job.version)
                        self._held_slot[s] = job.session
                    rx = None
                    if self.return_routed_experts:  # rows of the P + R - 1 fed tokens
                        n_fed = len(job.handle.request.prompt_ids) + len(job.tokens) - 1
                        rx = np.asarray(self._slots["rx"][s, :n_fed])
                    if job.handle._finish_one(job.index, self._sample_of(job, reason, rx)):
                        finished.append(job.handle)
            self._cond.notify_all()
        for h in finished:
            self._retire_handle(h)

    def _admit(self, params, slots: list):
        """Prefill the queued jobs just placed in ``slots``: grouped by prompt bucket and row
        count; with ``prefill_chunk`` the first chunk of each prompt, then :meth:`_extend`."""
        chunk = self.prefill_chunk or self.max_len
        resumed = [s for s in slots if self._jobs[s].start]
        slots = [s for s in slots if not self._jobs[s].start]
        by_bucket = collections.defaultdict(list)
        for s in slots:
            n = min(len(self._jobs[s].handle.request.prompt_ids), chunk)
            by_bucket[next(b for b in self.prompt_buckets if b >= n)].append(s)
        for Pb, group in sorted(by_bucket.items()):
            while group:
                nb = next((z for z in self.prefill_sizes if z >= len(group)), self.prefill_sizes[-1])
                part, group = group[:nb], group[nb:]
                tokens = np.zeros((nb, Pb), np.int32)
                ints = np.zeros((nb, 6), np.int32)
                ints[:, 0] = 1
                ints[:, 1] = self.num_slots  # out of range: dropped
                floats = np.zeros((nb, 2), np.float32)
                stops = np.full((nb, self.max_stop_tokens), -1, np.int32)
                for r, s in enumerate(part):
                    job = self._jobs[s]
                    p, sp = job.handle.request.prompt_ids[:chunk], job.sp
                    tokens[r, :len(p)] = p
                    seed = np.asarray([job.seed >> 32, job.seed & 0xFFFFFFFF], np.uint32).view(np.int32)
                    ints[r] = (len(p), s, sp.top_k, sp.max_new_tokens, seed[0], seed[1])
                    floats[r] = (sp.temperature, sp.top_p)
                    stops[r, :len(sp.stop_token_ids)] = sp.stop_token_ids
                self._cache, self._logits, self._slots = self._admit_fn(
                    params, self._cache, self._logits, self._slots, tokens, ints, floats, stops)
        rest = {s: (chunk, self._jobs[s].handle.request.prompt_ids) for s in slots
                if len(self._jobs[s].handle.request.prompt_ids) > chunk}
        rest.update({s: (self._jobs[s].start, self._jobs[s].handle.request.prompt_ids) for s in resumed})
        if rest:
            self._extend(params, rest, fresh=set(resumed))

    def _extend(self, params, rest: dict, fresh: set):
        """Prefill the rest of each prompt in chunks of at most ``prefill_chunk`` tokens (the
        whole rest without it): ``rest`` maps slot -> (tokens already in the cache, prompt);
        one continuation call per (chunk round, row group), the chunk padded to a prompt
        bucket; slots in ``fresh`` (continued sessions) get their sample's settings with
        their first chunk."""
        if self._extend_fn is None:
            self._extend_fn = self._extend_program()
        chunk = self.prefill_chunk or self.max_len
        fresh = set(fresh)
        while rest:
            group = sorted(rest)
            size = max(min(chunk, len(rest[s][1]) - rest[s][0]) for s in group)
            Cb = next(b for b in self.prompt_buckets if b >= size)
            while group:
                nb = next((z for z in self.prefill_sizes if z >= len(group)), self.prefill_sizes[-1])
                part, group = group[:nb], group[nb:]
                tokens = np.zeros((nb, Cb), np.int32)
                ints = np.zeros((nb, 8), np.int32)
                ints[:, 2] = self.num_slots  # out of range: dropped
                floats = np.zeros((nb, 2), np.float32)
                stops = np.full((nb, self.max_stop_tokens), -1, np.int32)
                for r, s in enumerate(part):
                    start, p = rest[s]
                    piece = p[start:start + chunk]
                    tokens[r, :len(piece)] = piece
                    ints[r, :3] = (start, len(piece), s)
                    rest[s] = (start + len(piece), p)
                    if s in fresh:
                        fresh.discard(s)
                        job = self._jobs[s]
                        sp = job.sp
                        seed = np.asarray([job.seed >> 32, job.seed & 0xFFFFFFFF], np.uint32).view(np.int32)
                        ints[r, 3:] = (sp.top_k, sp.max_new_tokens, seed[0], seed[1], 1)
                        floats[r] = (sp.temperature, sp.top_p)
                        stops[r, :len(sp.stop_token_ids)] = sp.stop_token_ids
                self._cache, self._logits, self._slots = self._extend_fn(
                    params, self._cache, self._logits, self._slots, tokens, ints, floats, stops)
            rest = {s: v for s, v in rest.items() if v[0] < len(v[1])}

    def _free_slot(self, s: int):
        """Host side only: the device row keeps decoding (greedily once past its budget, its
        output ignored) until an admission overwrites it."""
        self._jobs[s] = None

    def _sample_of(self, job: _Job, reason: str, routed_experts=None) -> Sample:
        return Sample(prompt_ids=np.asarray(job.handle.request.prompt_ids, np.int32),
                      response_ids=np.asarray(job.tokens, np.int32),
                      logprobs=np.asarray(job.logps, np.float32), finish_reason=reason,
                      weight_version=job.version or self._version, routed_experts=routed_experts)

    def _retire_handle(self, handle: RequestHandle, error=None):
        with self._cond:
            self._handles.pop(handle.rid, None)
            self._cond.notify_all()
        handle._complete(error)

    def _fail(self, error: BaseException):
        with self._cond:
            self._error = error
            handles = list(self._handles.values())
            self._queue.clear()
            self._jobs = [None] * self.num_slots
            self._inflight = None
        for h in handles:
            self._retire_handle(h, error)

    # background loop

    def start(self) -> None:
        """Run :meth:`step` on a daemon thread whenever there is work (idempotent)."""
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self.run, name="jax-engine", daemon=True)
            self._thread.start()

    def run(self) -> None:
        """The loop :meth:`start` runs: wait for work, step, until :meth:`stop`."""
        while True:
            with self._cond:
                while not self._stopping and (self._paused or not (self._queue or self.num_running())):
                    self._cond.wait(0.5)
                if self._stopping:
                    return
            try:
                self.step()
            except BaseException:
                return

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the background loop (running samples stay in their slots)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            t = self._thread
        if t is not None:
            t.join(timeout)
        self._thread = None

    def _background(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _wait(self, handles, timeout: Optional[float]):
        deadline = None if timeout is None else time.monotonic() + timeout
        for h in handles:
            while not h.done():
                if not self._background():
                    if self._paused:
                        raise RolloutError("engine is paused with requests pending (resume() first)")
                    self.step()
                else:
                    h._event.wait(0.05)
                if deadline is not None and time.monotonic() > deadline:
                    raise RolloutError(f"generate: not finished within {timeout} s")

    # ------------------------------------------------------------------------------------------
    # the RolloutEngine protocol

    def generate(self, requests: Sequence[Request], timeout: Optional[float] = None) -> Rollouts:
        """Submit every request, drive (or wait for) the engine, return the groups in request
        order (see :class:`~cascade_jax.rollout.types.RolloutEngine`)."""
        handles = [self.submit(r) for r in requests]
        self._wait(handles, timeout)
        return Rollouts(requests=tuple(requests), groups=tuple(h.result() for h in handles))

    def score(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
              *, batch_size: Optional[int] = None, temperature: float = 1.0) -> list:
        """Teacher-forced ``[len(response)]`` float32 log-probs per pair at ``temperature``
        (default 1: the protocol's; ``log softmax(z / τ)[y]``) under the current weights
        (:func:`cascade_jax.rollout.scoring.score_logprobs`: the trainer's chunked log-softmax
        over the full forward)."""
        with self._cond:
            if "weights" in self._released:
                raise RolloutError("score: the weights are released; resume them first")
            params = self._params
        return score_logprobs(params, self.model_cfg, prompts, responses,
                              batch_size=batch_size or self.num_slots, model=self.model,
                              temperature=temperature)

    def update_weights(self, params, version: str, *, timeout: float = 600.0,
                       check_order: bool = True, donate: bool = False) -> None:
        """Swap in ``params`` labelled ``version`` (:func:`check_version_order`; with
        ``check_order=False`` any label is taken, the current one included: a bucket of a
        multi-part update). Same tree
        and shapes required (:class:`RolloutError` naming the first bad leaf); leaves already
        on the engine's sharding and dtype are used without a copy, others are converted.
        Stops admitting, lets running samples finish (driving :meth:`step` itself when no
        background loop runs), swaps, resumes admitting.

        On a mesh the new weights land in place: every leaf is ``device_put`` straight onto the
        engine's existing ``NamedSharding`` (a host array sends each device its slice, an array
        on another mesh is resharded device to device; nothing is gathered onto one device), a
        dtype cast runs on the leaf's own devices first and its temporary is donated. The
        replaced weights are dropped when the swap is done (freed unless the caller still holds
        them). ``donate=True``: the caller hands ``params`` over, so leaves that must move are
        donated (freed as they land) instead of copied."""
        version = str(version)
        with self._cond:
            if self._released:
                raise RolloutError(f"update_weights {version!r}: device memory is released "
                                   f"({sorted(self._released)}); resume it first")
            if check_order:
                check_version_order(self._version, version)
        new = self._conform(params, donate)
        deadline = time.monotonic() + timeout
        with self._cond:
            self._admitting = False
        try:
            while True:
                with self._cond:
                    if self.num_running() == 0:
                        self._params = new
                        self._version = version
                        return
                    if self._paused:
                        raise RolloutError(
                            f"update_weights {version!r}: {self.num_running()} samples are in "
                            "their slots while paused; abort them or resume first")
                if time.monotonic() > deadline:
                    raise RolloutError(f"update_weights {version!r}: running samples did not "
                                       f"finish within {timeout} s")
                if self._background():
                    with self._cond:
                        self._cond.wait(0.05)
                else:
                    self.step()
        finally:
            with self._cond:
                self._admitting = True
                self._cond.notify_all()

    def _conform(self, params, donate: bool = False):
        old_leaves, old_def = jax.tree.flatten_with_path(self._params)
        new_leaves, new_def = jax.tree.flatten_with_path(params)
        if old_def != new_def:
            raise RolloutError("update_weights: the parameter tree differs from the engine's "
                               f"({len(new_leaves)} leaves vs {len(old_leaves)})")
        out = []
        for (path, old), (_, leaf) in zip(old_leaves, new_leaves):
            name = jax.tree_util.keystr(path)
            if tuple(leaf.shape) != tuple(old.shape):
                raise RolloutError(f"update_weights: {name} has shape {tuple(leaf.shape)}, "
                                   f"expected {tuple(old.shape)}")
            given = leaf
            if leaf.dtype != old.dtype:  # on the host, or on the leaf's own devices
                leaf = (leaf.astype(old.dtype) if isinstance(leaf, jax.Array)
                        else np.asarray(leaf, old.dtype))
            sharding = getattr(old, "sharding", None)
            if sharding is not None and getattr(leaf, "sharding", None) != sharding:
                mine = isinstance(leaf, jax.Array) and (leaf is not given or donate)
                leaf = jax.device_put(leaf, sharding, donate=mine)
            out.append(leaf)
        return jax.tree.unflatten(old_def, out)

    def weight_version(self) -> str:
        with self._cond:
            return self._version

    def params(self):
        """The parameter pytree now in use."""
        with self._cond:
            return self._params

    def progress(self, rid: str) -> Optional[list]:
        """Tokens and log-probs decoded so far by each sample of request ``rid`` (``[(tokens,
        logps)]`` in sample order; a queued sample has none), or None when ``rid`` is not in
        flight. What a streaming server reads between retirements."""
        with self._cond:
            h = self._handles.get(rid)
            if h is None:
                return None
            out = [([], []) if s is None else (list(s.response_ids), list(s.logprobs)) for s in h.samples]
            for j in self._jobs:
                if j is not None and j.handle is h:
                    out[j.index] = (list(j.tokens), list(j.logps))
            return out

    #: what :meth:`release_memory` can free: the parameters, and the decode state (per-slot
    #: cache, next-token logits, recorded experts)
    MEMORY_TAGS = ("weights", "kv_cache")

    def release_memory(self, tags: Optional[Sequence[str]] = None) -> dict:
        """Free the device buffers of ``tags`` (None = all of :attr:`MEMORY_TAGS`) while idle:
        ``weights`` are copied to host memory first (restored by :meth:`resume_memory`),
        ``kv_cache`` is dropped (rebuilt empty). Returns ``{tag: bytes freed}``; requests
        submitted meanwhile are refused (``RolloutError``). Raises when busy or unknown tag.
        The weight arrays are deleted, so never release an engine whose params alias someone
        else's (e.g. the trainer's after an in-process :meth:`update_weights`)."""
        tags = list(self.MEMORY_TAGS if tags is None else tags)
        for t in tags:
            if t not in self.MEMORY_TAGS:
                raise ValueError(f"tags: unknown tag {t!r}; valid: {list(self.MEMORY_TAGS)}")
        freed = {}
        with self._step_lock, self._cond:
            if self.num_running() or self._queue:
                raise RolloutError("release_memory: requests are running or queued")
            if "weights" in tags and "weights" not in self._released:
                leaves, tree = jax.tree.flatten(self._params)
                host = [np.array(x, copy=True) for x in leaves]
                freed["weights"] = _delete(leaves)
                self._host_params = (tree, host, [getattr(x, "sharding", None) for x in leaves])
                self._params = None
                self._released.add("weights")
            if "kv_cache" in tags and "kv_cache" not in self._released:
                bufs = jax.tree.leaves(self._cache) + [self._logits] + (
                    [self._slots["rx"]] if "rx" in self._slots else [])
                freed["kv_cache"] = _delete(bufs)
                self._cache = self._logits = None
                self._held.clear()
                self._held_slot.clear()
                self._slots.pop("rx", None)
                self._released.add("kv_cache")
        return freed

    def resume_memory(self, tags: Optional[Sequence[str]] = None) -> dict:
        """Undo :meth:`release_memory` for ``tags`` (None = all): weights back on the device from
        the host copy, an empty decode state. Returns ``{tag: bytes allocated}``."""
        tags = list(self.MEMORY_TAGS if tags is None else tags)
        for t in tags:
            if t not in self.MEMORY_TAGS:
                raise ValueError(f"tags: unknown tag {t!r}; valid: {list(self.MEMORY_TAGS)}")
        out = {}
        with self._step_lock, self._cond:
            if "weights" in tags and "weights" in self._released:
                tree, host, shardings = self._host_params
                leaves = [jax.device_put(h, s) if s is not None else jnp.asarray(h) for h, s in zip(host, shardings)]
                self._params = jax.tree.unflatten(tree, leaves)
                self._host_params = None
                self._released.discard("weights")
                out["weights"] = sum(int(x.nbytes) for x in leaves)
            if "kv_cache" in tags and "kv_cache" in self._released:
                self._cache = self._new_cache()
                self._logits = self._place(jnp.zeros((self.num_slots, self.vocab_size), jnp.float32))
                if self.return_routed_experts:
                    self._slots["rx"] = self._place(jnp.full(self._rx_shape, -1, jnp.int32),
                                                    self._slots_sh and self._slots_sh["rx"])
                self._slots["done"] = self._place(jnp.ones(self.num_slots, bool))
                self._released.discard("kv_cache")
                out["kv_cache"] = sum(int(x.nbytes) for x in jax.tree.leaves(self._cache)) + int(self._logits.nbytes) \
                    + (int(self._slots["rx"].nbytes) if "rx" in self._slots else 0)
        return out

    def released(self) -> tuple:
        """The memory tags now released (empty when everything is on the device)."""
        with self._cond:
            return tuple(sorted(self._released))

    def health(self) -> bool:
        """True unless a step failed (then every later call raises)."""
        return self._error is None

    # ------------------------------------------------------------------------------------------

    def warmup(self) -> None:
        """Compile the decode program and every (prefill size, prompt bucket) admission program
        (and continuation program, with ``prefill_chunk`` or ``keep_sessions``) on dummy data (the slots' state is reset afterwards; call while idle)."""
        with self._step_lock, self._cond:
            if self.num_running() or self._queue:
                raise RolloutError("warmup: the engine is busy")
            params = self._params
            for Pb in self.prompt_buckets:
                for nb in self.prefill_sizes:
                    ints = np.zeros((nb, 6), np.int32)
                    ints[:, 0], ints[:, 1] = 1, self.num_slots  # every row dropped
                    self._cache, self._logits, self._slots = self._admit_fn(
                        params, self._cache, self._logits, self._slots,
                        np.zeros((nb, Pb), np.int32), ints, np.zeros((nb, 2), np.float32),
                        np.full((nb, self.max_stop_tokens), -1, np.int32))
            if self.prefill_chunk is not None or self.keep_sessions:  # the continuation programs
                if self._extend_fn is None:
                    self._extend_fn = self._extend_program()
                for Cb in self.prompt_buckets:
                    for nb in self.prefill_sizes:
                        ints = np.zeros((nb, 8), np.int32)
                        ints[:, 2] = self.num_slots  # every row dropped
                        self._cache, self._logits, self._slots = self._extend_fn(
                            params, self._cache, self._logits, self._slots,
                            np.zeros((nb, Cb), np.int32), ints, np.zeros((nb, 2), np.float32),
                            np.full((nb, self.max_stop_tokens), -1, np.int32))
            self._cache, self._logits, self._slots, toks, _, _ = self._decode_fn(
                params, self._cache, self._logits, self._slots, np.int32(0))
            jax.block_until_ready(toks)

    def bare_decode(self, steps: int, prompt_len: int = 1) -> Callable[[], None]:
        """The engine's device work without its host work, for benchmarks: a callable that sets
        every slot decoding (position ``prompt_len``, τ = 1, untruncated, sample seed = slot,
        over whatever the cache holds) and runs the decode program ``ceil(steps /
        steps_per_call)`` times (no early exit, no admission, no reads back, no retirement),
        waits for the device and leaves the slots free. Call while idle."""
        S = self.num_slots
        if not 1 <= prompt_len < self.max_len:
            raise ValueError(f"prompt_len: must lie in [1, max_len={self.max_len}), got {prompt_len}")
        start = {"pos": np.full(S, prompt_len, np.int32), "step": np.zeros(S, np.int32),
                 "seed": np.stack([np.zeros(S), np.arange(S)], 1).astype(np.uint32),
                 "temp": np.ones(S, np.float32), "top_p": np.ones(S, np.float32),
                 "top_k": np.full(S, -1, np.int32), "budget": np.full(S, steps, np.int32),
                 "done": np.zeros(S, bool)}
        calls = -(-int(steps) // self.steps_per_call)
        place = lambda k, v: self._place(jnp.asarray(v), self._slots_sh and self._slots_sh[k])

        def run():
            with self._step_lock:
                if self.num_running() or self._queue:
                    raise RolloutError("bare_decode: the engine is busy")
                params = self._params
                self._slots = {**self._slots, **{k: place(k, v) for k, v in start.items()}}
                for _ in range(calls):
                    self._cache, self._logits, self._slots, toks, _, _ = self._decode_fn(
                        params, self._cache, self._logits, self._slots, np.int32(0))
                jax.block_until_ready(toks)
                self._slots = {**self._slots, "done": place("done", np.ones(S, bool))}

        return run
