"""The JAX rollout server: :class:`~cascade_jax.rollout.engine.JaxEngine` behind FastAPI/uvicorn,
speaking SGLang 0.5.23's HTTP protocol for what an RL trainer uses (docs/rollout-protocol.md §2-5,
§11; shapes in :mod:`cascade_jax.rollout.sglang_api`), so a trainer, ``sglang-router`` or the
SGLang clients of slime, verl and AReaL cannot tell it from an SGLang server; plus SGLang's
OpenAI-compatible routes (:mod:`cascade_jax.rollout.openai_api`).

    python launch/serve.py --checkpoint DIR [--host 127.0.0.1] [--port 30000] [--api-key K]

Endpoints: ``/generate`` (also ``stream: true``), ``/health``, ``/health_generate``,
``/get_model_info`` (``/model_info``), ``/get_server_info`` (``/server_info``),
``/get_weight_version``, ``/update_weights_from_disk``, ``/init_weights_update_group``,
``/update_weights_from_distributed``, ``/destroy_weights_update_group``,
``/update_weights_from_tensor`` (validated, then refused: see below),
``/release_memory_occupation``, ``/resume_memory_occupation``, ``/pause_generation``,
``/continue_generation``, ``/flush_cache``, ``/abort_request``, ``GET /v1/loads``,
``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Behaviour:

* Every request of a ``/generate`` body is submitted to the engine's continuous batch (``n``
  samples of one item form one engine request, sample ``i`` seeded ``(sampling_seed, i)``).
  ``return_logprob`` with ``logprob_start_len >= 0`` adds the prompt's teacher-forced
  log-probs (engine ``score``; concurrent scoring calls are batched). ``max_new_tokens: 0``
  is pure scoring. ``top_logprobs_num k`` adds SGLang's ``output_top_logprobs`` /
  ``input_top_logprobs`` (one full forward of prompt + response after the sample finishes).
  ``stream: true`` answers SSE chunks, cumulative, as the engine retires tokens.
  ``image_data`` / ``video_data`` / ``audio_data`` are accepted empty and refused otherwise;
  ``sampling_params.custom_params`` is accepted (no custom logit processor runs).
* ``--keep-sessions``: ``session_params: {"id": ...}`` on an unbatched ``n = 1`` body keeps the
  finished sample's cache under that id; the session's next prompt, when it extends the kept
  row, prefills only the appended tokens (multi-turn episodes, ``cascade_jax.agentic``). SGLang's
  other session fields must be unset (no ``/open_session``); without the flag a session is 400.
* ``--zero-mismatch``: the engine is :class:`cascade_jax.rollout.exact.ExactEngine` (continuous
  batching, cached decode by the kernel-invariant model), so a trainer using
  ``model=models.nemotron_h.invariant`` recomputes the returned log-probs bit for bit, whatever
  else was batched with the request; ``return_routed_experts`` works as in the default mode;
  top-p < 1 / top-k are refused. (A :class:`RolloutServer` given a default engine with
  ``zero_mismatch`` samples each item by :func:`cascade_jax.rollout.exact.generate_exact` over
  rows of the engine's ``max_len``, the trainer's ``row_len`` mode.)
* ``--mesh tensor:4,expert:2``: the engine runs on a mesh over this node's devices
  (:mod:`cascade_jax.sharding.rollout`): the checkpoint is read straight into the weights'
  shards, caches are sharded by the same rules table, and disk / distributed weight updates are
  loaded onto the engine's shardings (each device gets its slices; nothing gathered on one).
  A mesh that asks for more devices than present, names an unknown axis or does not split the
  model's heads / experts / the slots is a start-up error naming the field (exit code 2).
* ``return_routed_experts: true`` adds ``meta_info.routed_experts`` in SGLang 0.5.23's layout:
  base64 of int32 ``[P + R - 1, num_hidden_layers, top_k]``, each MoE layer's experts at its
  global layer index, the other layers 0 (:class:`sglang_api.RoutedLayout`); the server must
  run with ``--enable-return-routed-experts``, else a 400 naming the field.
* Pause (``mode`` ``abort``, the default, or ``in_place``/``retract``) stops the engine; ``abort``
  also finishes every running request with finish reason ``abort`` (clients resubmit). New
  ``/generate`` requests wait until ``/continue_generation``.
* A weight update (disk or distributed) waits until no request is in flight (new ones wait),
  loads and validates the new weights before swapping; a missing, corrupt or mismatched
  checkpoint is refused with 400 and the previous version keeps serving. A disk update reads
  into reused host memory (``--update-buffers``, :class:`~models.nemotron_h.checkpoint.HostBuffers`:
  the slab of the version before last, never one still referenced). ``weight_version`` is
  optional (absent: the label stays, as SGLang does); a given one may repeat the current label
  but decimal labels never go backwards. ``/flush_cache`` answers 400 while requests run or wait.
* Distributed updates: ``/init_weights_update_group`` (``master_port`` an int or a decimal
  string) starts this server's torch.distributed peer (:mod:`torch_peer`, own process with
  torch) at rank ``rank_offset``; each ``/update_weights_from_distributed`` receives its tensors
  (one flat broadcast per bucket with ``load_format: "flattened_bucket"``, else one per tensor),
  merges them into the host copy of the served Hub tensors and swaps the rebuilt model in at
  once: every bucket loads as it arrives (SGLang's behaviour; slime sends the version with each).
* ``/update_weights_from_tensor``: SGLang's clients send torch ``MultiprocessingSerializer``
  pickles of CUDA-IPC handles; the body is validated, then refused (400) with a message naming
  the disk and distributed endpoints.
* ``/release_memory_occupation`` (``tags`` null = all, ``["weights"]``, ``["kv_cache"]``;
  ``cuda_graph`` is accepted and frees nothing) waits for idle, copies the weights to host
  memory and deletes the device buffers; ``/resume_memory_occupation`` puts them back (an empty
  decode state). Both answer ``{success, message, bytes: {tag: n}, released}``; ``/generate``
  answers 503 while anything is released.
* ``--api-key``: every endpoint but the health probes (``/health``, ``/health_generate``, which
  SGLang also leaves open so routers and orchestrators can probe) requires
  ``Authorization: Bearer <key>`` (401 otherwise).
  Malformed JSON, unknown fields, wrong types and out-of-range values are 400 with a message
  naming the field; no request can take the server down.
* Start-up: programs compile on first use (``--warmup`` compiles every shape first) and go to
  JAX's persistent compilation cache (``--compilation-cache-dir``), so a restart reuses them.
  Once uvicorn listens the server prints ``ready: serving http://HOST:PORT (...)`` with the time
  it took; ``/health`` is 200 from then on (``/health_generate`` runs a real generation).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import functools
import logging
import time
import uuid
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from cascade_jax.sharding.rollout import engine_mesh
from cascade_jax.sharding.rules import ShardingError
from cascade_jax.sharding.state import param_shardings
from models.nemotron_h.checkpoint import HostBuffers

from . import openai_api, sglang_api
from .exact import ExactEngine
from .scoring import pow2_at_least
from .sglang_api import RequestError, read_json
from .types import Request, RolloutError

__all__ = ["RolloutServer", "build_parser", "main"]

log = logging.getLogger("cascade_jax.rollout.server")

#: the SGLang release whose protocol this server speaks (reported as ``version``)
SGLANG_VERSION = "0.5.23"
#: ``include`` sections of ``/v1/loads``
LOAD_SECTIONS = frozenset({"core", "memory", "spec", "lora", "disagg", "queues", "all"})


def _err(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=status)


def _update_reply(ok: bool, message: str, status: Optional[int] = None, **extra) -> JSONResponse:
    return JSONResponse({"success": ok, "message": message, **extra},
                        status_code=status if status is not None else (200 if ok else 400))


@functools.partial(jax.jit, static_argnames=("model_cfg", "k"))
def _top_rows(params, tokens, segment_ids, inv_t, model_cfg, k):
    """Top-``k`` log-probs after every position of ``tokens [1, T]``: ``(logp [1, T, k], ids)``
    of ``log_softmax(logits)`` and of ``log_softmax(logits · inv_t)``; logits = final hidden
    states @ ``lm_head`` in fp32."""
    from models import nemotron_h as nh
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    h = nh.hidden_states(params, tokens, model_cfg, positions=pos, segment_ids=segment_ids)
    z = jnp.einsum("bth,hv->btv", h.astype(jnp.float32), params["lm_head"].astype(jnp.float32))
    v1, i1 = jax.lax.top_k(jax.nn.log_softmax(z, -1), k)
    vt, it = jax.lax.top_k(jax.nn.log_softmax(z * inv_t, -1), k)
    return v1, i1, vt, it


class _ScoreBatcher:
    """Collects concurrent teacher-forced scoring calls into one ``engine.score`` call of
    ``max_batch`` rows (padded with dummy pairs), so scoring compiles one program per padded
    length (:meth:`warmup` compiles them all)."""

    def __init__(self, engine, max_batch: int):
        self.engine = engine
        self.max_batch = max_batch
        self.pending: list = []
        self.task: Optional[asyncio.Task] = None

    async def score(self, prompt: list, response: list) -> np.ndarray:
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((prompt, response, fut))
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._drain())
        return await fut

    def warmup(self, max_len: int) -> None:
        """Compile the scoring program of every padded length up to ``max_len``."""
        T = 16
        while True:
            self.engine.score([[0]] * self.max_batch, [[0] * (T - 1)] * self.max_batch, batch_size=self.max_batch)
            if T >= max_len:
                return
            T *= 2

    async def _drain(self):
        while self.pending:
            await asyncio.sleep(0)  # let concurrent handlers enqueue
            batch, self.pending = self.pending[:self.max_batch], self.pending[self.max_batch:]
            pad = [([0], [0])] * (self.max_batch - len(batch))  # always max_batch rows: one program per length
            try:
                out = await asyncio.to_thread(self.engine.score, [b[0] for b in batch] + [p for p, _ in pad],
                                              [b[1] for b in batch] + [r for _, r in pad], batch_size=self.max_batch)
                for (_, _, fut), lp in zip(batch, out):
                    if not fut.done():
                        fut.set_result(lp)
            except BaseException as e:  # noqa: BLE001 - delivered to every waiter
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)


class RolloutServer:
    """The HTTP layer around one engine (see module doc). ``app`` is the FastAPI application."""

    def __init__(self, engine, model_cfg, *, checkpoint: str, dtype=None, api_key: Optional[str] = None,
                 tokenizer=None, server_args: Optional[dict] = None, update_timeout_s: float = 600.0,
                 zero_mismatch: bool = False, served_model_name: Optional[str] = None,
                 host_buffers: Optional[HostBuffers] = None):
        self.engine = engine
        self.host_buffers = host_buffers  # reused host memory for disk updates (double-buffering)
        self.zero_mismatch = bool(zero_mismatch)
        # the zero-mismatch engine serves with continuous batching like any engine; a default
        # engine with zero_mismatch falls back to rollout.exact.generate_exact per item
        self._exact_items = self.zero_mismatch and not isinstance(engine, ExactEngine)
        self.model_cfg = model_cfg
        self.checkpoint = checkpoint
        self.dtype = dtype
        self.api_key = api_key
        self.tokenizer = tokenizer
        self.server_args = dict(server_args or {})
        self.update_timeout_s = update_timeout_s
        self.inflight = 0  # /generate items submitted and not answered
        self.waiting = 0  # /generate bodies waiting for the gate
        self.paused = False
        self.gate: Optional[asyncio.Event] = None  # set = generation may proceed
        self.update_lock: Optional[asyncio.Lock] = None
        self.idle: Optional[asyncio.Condition] = None
        self.batcher = _ScoreBatcher(engine, max(1, engine.num_slots))
        self.peer = None  # weight_sync.TorchPeer while a group exists
        self.group_name: Optional[str] = None
        self.hub_shapes = self._hub_shapes()
        self.routed_layout = sglang_api.RoutedLayout.of(model_cfg) if "E" in model_cfg.pattern else None
        self._hub_cache: Optional[tuple] = None  # (weight version, {Hub name: host array}) for bucketed updates
        self.started = time.time()
        self._finished: collections.deque = collections.deque()  # (time, tokens) of finished samples
        self.served_model_name = served_model_name or checkpoint
        self.app = self._build_app()

    # ------------------------------------------------------------------------------------------

    def _hub_shapes(self) -> dict:
        from models import nemotron_h as nh
        return {name: None for name, _, _ in nh.hub_tensors(self.engine.params(), self.model_cfg)}

    def _vocab(self) -> int:
        return int(self.model_cfg.vocab_size)

    async def _ensure_async_state(self):
        if self.gate is None:
            self.gate = asyncio.Event()
            self.gate.set()
            self.update_lock = asyncio.Lock()
            self.idle = asyncio.Condition()

    async def _done_inflight(self, n: int):
        self.inflight -= n
        async with self.idle:
            self.idle.notify_all()

    async def _drain(self, what: str):
        """Wait (bounded) until no /generate item is in flight; the gate is closed by the caller."""
        async with self.idle:
            try:
                await asyncio.wait_for(self.idle.wait_for(lambda: self.inflight == 0), self.update_timeout_s)
            except asyncio.TimeoutError:
                raise RolloutError(f"{what}: {self.inflight} requests still running after "
                                   f"{self.update_timeout_s:.0f} s") from None

    # ------------------------------------------------------------------------------------------
    # generation

    def _text_of(self, item):
        if not item.return_text_in_logprobs or self.tokenizer is None:
            return None
        return lambda t: self.tokenizer.decode([t])

    async def _run_item(self, item: sglang_api.GenerateItem, loop) -> list:
        """The item's samples and (with ``logprob_start_len >= 0``) its prompt log-probs:
        ``(samples, input_lps, t0)``."""
        t0 = time.perf_counter()
        fut = loop.create_future()

        def on_done(h):
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(h))

        if self._exact_items:
            handle = _ExactRun(self.engine, item, loop, on_done)
        else:
            handle = self.engine.submit(Request(prompt_ids=item.prompt_ids, sampling=item.sampling,
                                                rid=item.rid), on_done=on_done,
                                        **({"session": item.session} if item.session is not None else {}))
        input_lps = None
        try:
            if item.logprob_start_len >= 0:
                p = list(item.prompt_ids)
                lp = await self.batcher.score(p[:1], p[1:]) if len(p) > 1 else np.zeros(0, np.float32)
                input_lps = ([None] + [float(x) for x in lp])[item.logprob_start_len:]
            await fut
        except asyncio.CancelledError:
            self.engine.abort(handle.rid)
            raise
        return handle.result(0), input_lps, t0

    async def _item_replies(self, item, run) -> list:
        """SGLang reply items of one finished item (one per sample)."""
        samples, input_lps, t0 = run
        n = item.sampling.n
        out = []
        for k, s in enumerate(samples):
            resp = [int(t) for t in s.response_ids]
            self._finished.append((time.time(), len(resp)))
            out_top = in_top = None
            if item.top_logprobs_num > 0:
                out_top, in_top = await asyncio.to_thread(self._top_logprobs, item, resp)
            out.append(sglang_api.generate_item_reply(
                rid=item.rid if n == 1 else f"{item.rid}-{k}", prompt_ids=item.prompt_ids, output_ids=resp,
                output_logprobs=[float(x) for x in s.logprobs] if item.return_logprob else None,
                finish_reason=s.finish_reason, matched=resp[-1] if s.finish_reason == "stop" and resp else None,
                max_new_tokens=item.sampling.max_new_tokens, weight_version=s.weight_version,
                input_logprobs=input_lps, logprob_start_len=item.logprob_start_len,
                e2e_latency=time.perf_counter() - t0,
                routed_experts=s.routed_experts if item.return_routed_experts else None,
                routed_layout=self.routed_layout, output_top=out_top, input_top=in_top,
                text_of=self._text_of(item),
                text=self.tokenizer.decode(resp) if self.tokenizer is not None else ""))
        return out

    def _top_logprobs(self, item, response: list) -> tuple:
        """``(output_top, input_top)`` of one sample: for every response token the
        ``top_logprobs_num`` most likely ``(logp, id)`` under ``log_softmax(logits / T)`` (the
        sampling temperature, as ``output_token_logprobs``; T = 0 counts as 1), and for the
        prompt positions ``logprob_start_len .. P-1`` the same at temperature 1 (None at 0)."""
        seq = list(item.prompt_ids) + response
        P, k = len(item.prompt_ids), item.top_logprobs_num
        T = max(16, pow2_at_least(len(seq)))
        tokens = np.zeros((1, T), np.int32)
        seg = np.zeros((1, T), np.int32)
        tokens[0, :len(seq)], seg[0, :len(seq)] = seq, 1
        temp = item.sampling.temperature if item.sampling.temperature > 0 else 1.0
        kk = min(pow2_at_least(k), self._vocab())
        v1, i1, vt, it = (np.asarray(x)[0] for x in _top_rows(
            self.engine.params(), tokens, seg, np.float32(1.0 / temp), self.model_cfg, kk))
        out_top = [list(zip(vt[t, :k].tolist(), it[t, :k].tolist())) for t in range(P - 1, len(seq) - 1)]
        in_top = None
        if item.logprob_start_len >= 0:
            in_top = [None if t == 0 else list(zip(v1[t - 1, :k].tolist(), i1[t - 1, :k].tolist()))
                      for t in range(item.logprob_start_len, P)]
        return out_top, in_top

    def _check_items(self, items, body, batched):
        if items[0].session is not None and (self._exact_items or not getattr(self.engine, "keep_sessions", False)):
            raise RequestError("session_params", "this server was started without --keep-sessions")
        if items[0].return_routed_experts and not getattr(self.engine, "return_routed_experts", False):
            raise RequestError("return_routed_experts", "this server was started without "
                                                        "--enable-return-routed-experts")
        for i, it in enumerate(items):
            sfx = f"[{i}]" if batched and isinstance(body.get("sampling_params"), list) else ""
            if self.zero_mismatch and (it.sampling.top_p < 1.0 or it.sampling.top_k != -1):
                bad = "top_p" if it.sampling.top_p < 1.0 else "top_k"
                raise RequestError(f"sampling_params{sfx}.{bad}", "the server runs --zero-mismatch: "
                                   "sampling is from the full distribution (top_p 1, top_k -1)")
            if len(it.prompt_ids) > self.engine.prompt_buckets[-1]:
                raise RequestError(f"input_ids{f'[{i}]' if batched else ''}",
                                   f"prompt of {len(it.prompt_ids)} tokens exceeds the largest prompt bucket "
                                   f"{self.engine.prompt_buckets[-1]}")

    async def _enter(self, n_items: int) -> Optional[JSONResponse]:
        """Wait for the gate, count the items in flight; a 503 while memory is released."""
        released = self.engine.released() if hasattr(self.engine, "released") else ()
        if released:
            return _err(503, f"device memory is released ({', '.join(released)}); "
                             "call /resume_memory_occupation first")
        if not self.gate.is_set():
            self.waiting += 1
            try:
                await self.gate.wait()
            finally:
                self.waiting -= 1
        self.inflight += n_items
        return None

    async def generate(self, request: HTTPRequest):
        body = await read_json(request)
        items, batched = sglang_api.parse_generate(
            body, vocab_size=self._vocab(), context_length=self.engine.max_len,
            tokenize=(lambda t: [int(x) for x in self.tokenizer.encode(t)]) if self.tokenizer is not None else None,
            new_rid=lambda: uuid.uuid4().hex)
        self._check_items(items, body, batched)
        refused = await self._enter(len(items))
        if refused is not None:
            return refused
        loop = asyncio.get_running_loop()
        tasks = [asyncio.ensure_future(self._run_item(it, loop)) for it in items]
        if body.get("stream"):
            return StreamingResponse(self._stream(items, batched, tasks), media_type="text/event-stream")
        watch = asyncio.ensure_future(_watch_disconnect(request, tasks))
        try:
            runs = await asyncio.gather(*tasks)
            results = [await self._item_replies(it, run) for it, run in zip(items, runs)]
        except asyncio.CancelledError:
            return _err(499, "client disconnected")
        except ValueError as e:  # the engine's own validation (names the field)
            return _err(400, str(e))
        except RolloutError as e:  # the engine failed
            return _err(503, str(e))
        finally:
            watch.cancel()
            for t in tasks:
                t.cancel()
            await self._done_inflight(len(items))
        flat = [r for group in results for r in group]
        return JSONResponse(flat if batched else flat[0])

    async def _stream(self, items, batched, tasks):
        """SSE chunks (SGLang's cumulative streaming): a chunk whenever a sample has new tokens
        (``finish_reason`` null), the finished items, then ``[DONE]``. A disconnect cancels the
        items (the engine aborts them)."""
        sent: dict = {}
        done_items: set = set()
        t0 = time.perf_counter()
        try:
            while len(done_items) < len(items):
                for i, (it, task) in enumerate(zip(items, tasks)):
                    if i in done_items:
                        continue
                    if task.done():
                        replies = await self._item_replies(it, task.result())
                        for k, r in enumerate(replies):
                            if batched:
                                r["index"] = i * it.sampling.n + k
                            yield sglang_api.sse(r)
                        done_items.add(i)
                        continue
                    prog = None if self._exact_items else self.engine.progress(it.rid)
                    for k, (toks, lps) in enumerate(prog or []):
                        if len(toks) <= sent.get((i, k), 0):
                            continue
                        sent[(i, k)] = len(toks)
                        chunk = sglang_api.generate_item_reply(
                            rid=it.rid if it.sampling.n == 1 else f"{it.rid}-{k}", prompt_ids=it.prompt_ids,
                            output_ids=toks, output_logprobs=lps if it.return_logprob else None,
                            finish_reason=None, matched=None, max_new_tokens=it.sampling.max_new_tokens,
                            weight_version=self.engine.weight_version(), input_logprobs=None,
                            logprob_start_len=-1, e2e_latency=time.perf_counter() - t0,
                            text_of=self._text_of(it),
                            text=self.tokenizer.decode(toks) if self.tokenizer is not None else "")
                        if batched:
                            chunk["index"] = i * it.sampling.n + k
                        yield sglang_api.sse(chunk)
                pending = [t for i, t in enumerate(tasks) if i not in done_items and not t.done()]
                if pending:
                    await asyncio.wait(pending, timeout=0.05)
        except (ValueError, RolloutError) as e:
            yield sglang_api.sse({"error": {"message": str(e)}})
        finally:
            for t in tasks:
                t.cancel()
            await self._done_inflight(len(items))
        yield sglang_api.sse("[DONE]")

    # ------------------------------------------------------------------------------------------
    # weights

    async def _swap(self, params, version: Optional[str], what: str) -> None:
        """Close the gate, wait for in-flight requests, swap, reopen (unless paused).
        ``version`` None keeps the current label (SGLang: an update without ``weight_version``)."""
        self.gate.clear()
        try:
            await self._drain(what)
            label = self.engine.weight_version() if version is None else version
            await asyncio.to_thread(self.engine.update_weights, params, label, timeout=self.update_timeout_s,
                                    check_order=version is not None and version != self.engine.weight_version())
        finally:
            if not self.paused:
                self.gate.set()

    def _check_version(self, body: dict) -> Optional[str]:
        """The update's new label: None (absent: SGLang keeps the current one), the current one
        (e.g. every bucket of a multi-bucket update carries it), or a new one that must not go
        backwards (``check_version_order``)."""
        from .engine import check_version_order
        v = body.get("weight_version")
        if v is None:
            return None
        if not isinstance(v, str) or not v:
            raise RequestError("weight_version", f"expected a non-empty string, got {v!r}")
        if v != self.engine.weight_version():
            try:
                check_version_order(self.engine.weight_version(), v)
            except RolloutError as e:
                raise RequestError("weight_version", str(e)) from None
        return v

    def _param_shardings(self):
        """Where a weight update's leaves are loaded: the engine's shardings on its mesh (each
        device reads its own slice; nothing is gathered onto one device), None without one."""
        fn = getattr(self.engine, "param_shardings", None)
        return None if fn is None else fn()

    def _check_released(self, what: str):
        released = self.engine.released() if hasattr(self.engine, "released") else ()
        if "weights" in released:
            raise RequestError("weights", f"{what}: the weights are released; call /resume_memory_occupation "
                                          "with tags [\"weights\"] first")

    async def update_from_disk(self, request: HTTPRequest):
        from models import nemotron_h as nh
        body = sglang_api.check_body(await read_json(request), "/update_weights_from_disk", required=("model_path",))
        if not isinstance(body["model_path"], str):
            raise RequestError("model_path", f"expected a string, got {body['model_path']!r}")
        for k in ("abort_all_requests", "flush_cache", "is_async", "keep_pause", "torch_empty_cache",
                  "recapture_cuda_graph"):
            if body.get(k) is not None and not isinstance(body[k], bool):
                raise RequestError(k, f"expected a bool, got {body[k]!r}")
        if body.get("load_format") not in (None, "auto", "safetensors"):
            raise RequestError("load_format", f"only 'auto' / 'safetensors' checkpoints, got {body['load_format']!r}")
        self._check_released("update_weights_from_disk")
        async with self.update_lock:
            version = self._check_version(body)
            path = body["model_path"]
            t0 = time.perf_counter()
            shardings = self._param_shardings()
            try:
                cfg, params = await asyncio.to_thread(nh.load_checkpoint, path, dtype=self.dtype, sharding=shardings,
                                                      host_buffers=self.host_buffers if shardings is None else None)
            except (nh.CheckpointError, OSError, ValueError) as e:
                return _update_reply(False, f"Failed to update weights from {path}: {e}. The previous weights "
                                     f"(version {self.engine.weight_version()!r}) keep serving.",
                                     num_paused_requests=0)
            if cfg.to_hf_dict() != self.model_cfg.to_hf_dict():
                diff = sorted(k for k, v in cfg.to_hf_dict().items() if self.model_cfg.to_hf_dict().get(k) != v)
                return _update_reply(False, f"Failed to update weights from {path}: its config differs from the "
                                     f"served model in {diff}; the previous weights keep serving.",
                                     num_paused_requests=0)
            n_aborted = self.engine.abort_all() if body.get("abort_all_requests") else 0
            t1 = time.perf_counter()
            try:
                await self._swap(params, version, "update_weights_from_disk")
            except RolloutError as e:
                return _update_reply(False, f"Failed to update weights: {e}", num_paused_requests=n_aborted)
            del params
            hb = self.host_buffers
            log.info("update_weights_from_disk %s: read %.3f s, swap %.3f s (host slabs reused %d, allocated %d; "
                     "gc generation %d %.3f s)", path, t1 - t0, time.perf_counter() - t1,
                     *((hb.reused, hb.allocated, *hb.last_gc) if hb else (0, 0, 0, 0.0)))
            self.checkpoint = path
            self._hub_cache = None
        return _update_reply(True, "Succeeded to update model weights.", num_paused_requests=n_aborted)

    async def init_group(self, request: HTTPRequest):
        from .weight_sync import TorchPeer
        body = sglang_api.check_body(await read_json(request), "/init_weights_update_group",
                                     required=("master_address", "master_port", "rank_offset", "world_size"))
        for k in ("master_port", "rank_offset", "world_size"):
            v = body[k]
            if isinstance(v, str) and v.strip().isdigit():  # SGLang's request model converts "29500"
                v = body[k] = int(v)
            if not sglang_api._is_int(v) or v < (1 if k != "rank_offset" else 0):
                raise RequestError(k, f"expected a positive integer, got {body[k]!r}")
        if not body["rank_offset"] < body["world_size"]:
            raise RequestError("rank_offset", f"must be < world_size {body['world_size']}")
        if not isinstance(body["master_address"], str):
            raise RequestError("master_address", "expected a string")
        backend = body.get("backend") or "nccl"
        if backend not in ("nccl", "gloo"):
            raise RequestError("backend", f"must be 'nccl' or 'gloo', got {backend!r}")
        name = body.get("group_name") or "weight_update_group"
        async with self.update_lock:
            if self.peer is not None:
                return _update_reply(False, f"a weight update group ({self.group_name!r}) already exists; "
                                     "destroy it first")
            try:
                peer = TorchPeer(init_method=f"tcp://{body['master_address']}:{body['master_port']}",
                                 rank=body["rank_offset"], world_size=body["world_size"], group_name=name,
                                 backend=backend, timeout_s=self.update_timeout_s)
                await asyncio.to_thread(peer.wait_ready)
            except RolloutError as e:
                return _update_reply(False, f"Failed to initialize the weight update group: {e}")
            self.peer, self.group_name = peer, name
        return _update_reply(True, "Succeeded to initialize custom process group.")

    def _hub_now(self) -> dict:
        """Host Hub tensors of the weights now served (cached per weight version): a bucket is
        merged into them and the whole model rebuilt, so every bucket loads as it arrives."""
        from models import nemotron_h as nh
        v = self.engine.weight_version()
        if self._hub_cache is None or self._hub_cache[0] != v:
            self._hub_cache = (v, {n: f() for n, _, f in nh.hub_tensors(self.engine.params(), self.model_cfg)})
        return self._hub_cache[1]

    async def update_distributed(self, request: HTTPRequest):
        from models import nemotron_h as nh
        from .weight_sync import NUMPY_DTYPES
        body = sglang_api.check_body(await read_json(request), "/update_weights_from_distributed",
                                     required=("names", "dtypes", "shapes"))
        names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not names:
            raise RequestError("names", "expected a non-empty list of tensor names")
        if not isinstance(dtypes, list) or len(dtypes) != len(names):
            raise RequestError("dtypes", f"expected a list of {len(names)} dtype names")
        if not isinstance(shapes, list) or len(shapes) != len(names):
            raise RequestError("shapes", f"expected a list of {len(names)} shapes")
        dtypes = [d[len("torch."):] if isinstance(d, str) and d.startswith("torch.") else d for d in dtypes]
        for i, (d, sh) in enumerate(zip(dtypes, shapes)):
            if d not in NUMPY_DTYPES:
                raise RequestError(f"dtypes[{i}]", f"must be one of {sorted(NUMPY_DTYPES)}, got {d!r}")
            if not isinstance(sh, list) or not all(sglang_api._is_int(x) and x >= 0 for x in sh):
                raise RequestError(f"shapes[{i}]", f"expected a list of non-negative ints, got {sh!r}")
        fmt = body.get("load_format")
        if fmt not in (None, "flattened_bucket"):
            raise RequestError("load_format", f"must be null or 'flattened_bucket', got {fmt!r}")
        if fmt == "flattened_bucket" and len(set(dtypes)) != 1:
            raise RequestError("dtypes", "a flattened bucket must hold a single dtype")
        async with self.update_lock:
            if self.peer is None:
                return _update_reply(False, "no weight update group; call /init_weights_update_group first")
            if body.get("group_name") not in (None, self.group_name):
                raise RequestError("group_name", f"unknown group {body['group_name']!r} (have {self.group_name!r})")
            try:  # receive first: the sender's broadcast is under way, refusing now would hang it
                arrays = await asyncio.to_thread(self._receive, names, dtypes, shapes, fmt)
            except RolloutError as e:
                return _update_reply(False, f"Failed to receive weights: {e}")
            version = self._check_version(body)
            self._check_released("update_weights_from_distributed")
            unknown = [n for n in names if n not in self.hub_shapes]
            if unknown:
                return _update_reply(False, f"unknown tensor {unknown[0]!r} (not a Hub name of this model); "
                                     "the previous weights keep serving")
            try:
                hub = dict(await asyncio.to_thread(self._hub_now))
                for n, a in zip(names, arrays):
                    if tuple(a.shape) != tuple(hub[n].shape):
                        raise ValueError(f"{n} has shape {list(a.shape)}, the model's is {list(hub[n].shape)}")
                    hub[n] = np.array(a)
                params = await asyncio.to_thread(nh.params_from_hub_tensors, hub, self.model_cfg, dtype=self.dtype,
                                                 sharding=self._param_shardings())
            except (nh.CheckpointError, ValueError) as e:
                return _update_reply(False, f"Failed to load the received weights: {e}; the previous weights keep "
                                     "serving")
            if body.get("abort_all_requests"):
                self.engine.abort_all()
            try:
                await self._swap(params, version, "update_weights_from_distributed")
            except RolloutError as e:
                return _update_reply(False, f"Failed to update weights: {e}")
            self._hub_cache = (self.engine.weight_version(), hub)
        return _update_reply(True, "Succeeded to update parameter online.")

    def _receive(self, names, dtypes, shapes, fmt) -> list:
        sizes = [int(np.prod(s)) for s in shapes]
        if fmt == "flattened_bucket":
            flat = self.peer.broadcast(dtypes[0], sum(sizes))
            offs = np.cumsum([0] + sizes)
            return [flat[offs[i]:offs[i + 1]].reshape(s) for i, s in enumerate(shapes)]
        return [self.peer.broadcast(d, n).reshape(s) for d, n, s in zip(dtypes, sizes, shapes)]

    async def update_from_tensor(self, request: HTTPRequest):
        """SGLang's colocated path: ``serialized_named_tensors`` are torch
        ``MultiprocessingSerializer`` pickles of CUDA-IPC handles, which only a torch process on
        the same GPU can open (and unpickling them would run code a client chose). Validated,
        then refused with 400 naming the formats this server loads."""
        body = sglang_api.check_body(await read_json(request), "/update_weights_from_tensor",
                                     required=("serialized_named_tensors",))
        if not isinstance(body["serialized_named_tensors"], list):
            raise RequestError("serialized_named_tensors", "expected a list (one entry per tensor-parallel rank)")
        self._check_version(body)
        return _update_reply(False, "serialized_named_tensors: torch MultiprocessingSerializer / CUDA-IPC tensors "
                             "cannot be loaded by the JAX rollout server (load_format "
                             f"{body.get('load_format')!r}); supported: /update_weights_from_disk (Hub safetensors "
                             "directory) and /update_weights_from_distributed (torch.distributed broadcast, "
                             "'flattened_bucket' or per-tensor). The previous weights keep serving.")

    async def _memory(self, request: HTTPRequest, endpoint: str, release: bool):
        body = sglang_api.check_body(await read_json(request), endpoint)
        tags = body.get("tags")
        valid = list(self.engine.MEMORY_TAGS) + ["cuda_graph"]
        if tags is not None and (not isinstance(tags, list) or not all(isinstance(t, str) for t in tags)):
            raise RequestError("tags", f"expected a list of tag names ({valid}) or null, got {tags!r}")
        for i, t in enumerate(tags or []):
            if t not in valid:
                raise RequestError(f"tags[{i}]", f"unknown tag {t!r}; valid: {valid}")
        engine_tags = None if tags is None else [t for t in tags if t != "cuda_graph"]  # no CUDA graphs here
        async with self.update_lock:
            if release:
                self.gate.clear()
                try:
                    await self._drain(endpoint)
                    nbytes = await asyncio.to_thread(self.engine.release_memory, engine_tags)
                finally:
                    if not self.paused:
                        self.gate.set()
            else:
                nbytes = await asyncio.to_thread(self.engine.resume_memory, engine_tags)
        verb = "Released" if release else "Resumed"
        what = ", ".join(f"{t} {b / 2**20:.1f} MiB" for t, b in nbytes.items()) or "nothing (already done)"
        return JSONResponse({"success": True, "message": f"{verb} device memory: {what}.",
                             "bytes": nbytes, "released": list(self.engine.released())})

    async def destroy_group(self, request: HTTPRequest):
        body = sglang_api.check_body(await read_json(request), "/destroy_weights_update_group")
        async with self.update_lock:
            if self.peer is None:
                return _update_reply(False, "no weight update group")
            if body.get("group_name") not in (None, self.group_name):
                raise RequestError("group_name", f"unknown group {body['group_name']!r} (have {self.group_name!r})")
            peer, self.peer, self.group_name = self.peer, None, None
            await asyncio.to_thread(peer.close)
        return _update_reply(True, "Succeeded to destroy custom process group.")

    # ------------------------------------------------------------------------------------------
    # control

    async def pause(self, request: HTTPRequest):
        body = sglang_api.check_body(await read_json(request), "/pause_generation")
        mode = body.get("mode") or "abort"
        if mode not in ("abort", "retract", "in_place"):
            raise RequestError("mode", f"must be 'abort', 'retract' or 'in_place', got {mode!r}")
        self.paused = True
        self.gate.clear()
        self.engine.pause()
        n = self.engine.abort_all() if mode == "abort" else 0
        return JSONResponse({"message": "Generation paused successfully.", "status": "ok",
                             "num_aborted_requests": n})

    async def resume(self, request: HTTPRequest):
        sglang_api.check_body(await read_json(request), "/continue_generation")
        self.paused = False
        self.engine.resume()
        if not self.update_lock.locked():
            self.gate.set()
        return JSONResponse({"message": "Generation continued successfully.", "status": "ok"})

    async def flush(self, request: HTTPRequest):
        sglang_api.check_body(await read_json(request), "/flush_cache")
        if self.inflight or self.waiting or not self.engine.flush_cache():
            return PlainTextResponse("Cache not flushed. Please check there are no running or waiting requests.",
                                     status_code=400)
        return PlainTextResponse("Cache flushed.\nPlease check backend logs for more details. "
                                 "(When there are running or waiting requests, the operation will not be performed.)\n")

    async def abort_request(self, request: HTTPRequest):
        body = sglang_api.check_body(await read_json(request), "/abort_request")
        if body.get("abort_all") is not None and not isinstance(body["abort_all"], bool):
            raise RequestError("abort_all", f"expected a bool, got {body['abort_all']!r}")
        if body.get("abort_all"):
            self.engine.abort_all()
        elif isinstance(body.get("rid"), str):
            self.engine.abort(body["rid"])
        else:
            raise RequestError("rid", "a request id string (or abort_all: true) is required")
        return JSONResponse({})

    async def health_generate(self, request: HTTPRequest):
        if not self.engine.health():
            return _err(503, "engine failed")
        if self.paused:
            return PlainTextResponse("")
        from .types import SamplingParams
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.engine.submit(Request(prompt_ids=(0,), sampling=SamplingParams(max_new_tokens=1, temperature=0.0),
                                   rid=f"health-{uuid.uuid4().hex}"),
                           on_done=lambda h: loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(h)))
        try:
            await asyncio.wait_for(fut, 20.0)
        except asyncio.TimeoutError:
            return _err(503, "health generation timed out")
        return PlainTextResponse("")

    def model_info(self) -> dict:
        return {"model_path": self.checkpoint, "tokenizer_path": self.checkpoint if self.tokenizer else None,
                "is_generation": True, "preferred_sampling_params": None,
                "weight_version": self.engine.weight_version(), "has_image_understanding": False,
                "has_audio_understanding": False, "model_type": "nemotron_h",
                "architectures": ["NemotronHForCausalLM"]}

    def server_info(self) -> dict:
        """SGLang's ``/server_info``: its ``ServerArgs`` fields (the ones RL clients read, with
        this server's real values: one device, no tensor / pipeline / data / expert parallelism,
        memory release supported with a host copy of the weights), ``internal_states`` and
        ``version``; then this server's own settings."""
        a = self.server_args
        e = self.engine
        sglang_args = {
            "model_path": a.get("checkpoint", self.checkpoint), "tokenizer_path": a.get("checkpoint", self.checkpoint),
            "tokenizer_mode": "auto", "skip_tokenizer_init": self.tokenizer is None, "load_format": "auto",
            "trust_remote_code": False, "dtype": a.get("dtype", "auto"), "kv_cache_dtype": "auto",
            "context_length": e.max_len, "device": jax.default_backend(), "served_model_name": self.served_model_name,
            "is_embedding": False, "host": a.get("host"), "port": a.get("port"),
            "mem_fraction_static": None, "max_running_requests": e.num_slots,
            "max_total_tokens": e.num_slots * e.max_len, "chunked_prefill_size": e.prompt_buckets[-1],
            "max_prefill_tokens": e.prompt_buckets[-1] * e.num_slots, "page_size": 1,
            "tp_size": 1, "pp_size": 1, "dp_size": 1, "ep_size": 1, "nnodes": 1, "node_rank": 0,
            "random_seed": a.get("seed", 0), "stream_output": False, "stream_interval": 1,
            "enable_memory_saver": True, "enable_weights_cpu_backup": True, "disable_radix_cache": True,
            "enable_return_routed_experts": bool(getattr(e, "return_routed_experts", False)),
            "enable_deterministic_inference": self.zero_mismatch, "weight_version": e.weight_version(),
            "tool_call_parser": "qwen3_coder" if self.tokenizer is not None else None, "reasoning_parser": None,
            "attention_backend": "jax", "sampling_backend": "jax", "log_level": a.get("log_level", "warning"),
            "api_key": None,  # never echoed
        }
        own = {k: v for k, v in a.items() if k not in ("api_key", "checkpoint")}
        return {**own, **sglang_args, "zero_mismatch": self.zero_mismatch, "num_slots": e.num_slots,
                "prompt_buckets": list(e.prompt_buckets), "version": SGLANG_VERSION, "backend": sglang_api.BACKEND,
                "internal_states": [{"num_running_reqs": e.num_running(), "num_waiting_reqs": e.num_queued(),
                                     "last_gen_throughput": self._throughput(), "paused": self.paused,
                                     "inflight": self.inflight, "memory_released": list(e.released())}]}

    def _throughput(self, window_s: float = 10.0) -> float:
        """Generated tokens per second over the last ``window_s``."""
        now = time.time()
        while self._finished and self._finished[0][0] < now - window_s:
            self._finished.popleft()
        return sum(n for _, n in self._finished) / window_s

    async def loads(self, request: HTTPRequest):
        """SGLang's ``GET /v1/loads`` (query ``include``, ``dp_rank``, ``format=json``): one
        data-parallel rank."""
        q = request.query_params
        include = [x.strip() for x in (q.get("include") or "all").split(",") if x.strip()]
        bad = sorted(set(include) - LOAD_SECTIONS)
        if bad:
            raise RequestError("include", f"invalid sections {bad}; valid: {sorted(LOAD_SECTIONS)}")
        if q.get("format", "json") != "json":
            raise RequestError("format", f"only 'json' is served, got {q.get('format')!r}")
        if q.get("dp_rank") not in (None, "0"):
            raise RequestError("dp_rank", f"this server has one data-parallel rank (0), got {q.get('dp_rank')!r}")
        e = self.engine
        used, total = e.used_tokens(), e.num_slots * e.max_len
        load = {"dp_rank": 0, "timestamp": time.time(), "num_running_reqs": e.num_running(),
                "num_waiting_reqs": e.num_queued() + self.waiting, "num_used_tokens": used,
                "max_total_num_tokens": total, "token_usage": used / total, "gen_throughput": self._throughput(),
                "cache_hit_rate": 0.0, "utilization": e.num_running() / e.num_slots,
                "max_running_requests": e.num_slots}
        every = "all" in include
        if every or "memory" in include:
            released = e.released()
            wbytes = 0 if "weights" in released else sum(int(x.nbytes) for x in jax.tree.leaves(e.params()))
            kv = 0 if "kv_cache" in released else sum(int(x.nbytes) for x in jax.tree.leaves(e._cache))
            load["memory"] = {"weight_gb": wbytes / 2**30, "kv_cache_gb": kv / 2**30, "graph_gb": 0.0,
                              "token_capacity": total}
        if every or "queues" in include:
            load["queues"] = {"waiting": e.num_queued(), "grammar": 0, "paused": self.waiting, "retracted": 0}
        load["num_total_reqs"] = load["num_running_reqs"] + load["num_waiting_reqs"]
        return JSONResponse({
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(), "version": SGLANG_VERSION,
            "dp_rank_count": 1, "loads": [load],
            "aggregate": {"total_running_reqs": load["num_running_reqs"], "total_waiting_reqs": load["num_waiting_reqs"],
                          "total_reqs": load["num_total_reqs"], "total_used_tokens": used, "total_tokens": total,
                          "avg_token_usage": load["token_usage"], "avg_throughput": load["gen_throughput"],
                          "avg_utilization": load["utilization"]}})

    # ------------------------------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="cascade-jax rollout server", openapi_url=None, docs_url=None, redoc_url=None)
        srv = self

        @app.middleware("http")
        async def guard(request: HTTPRequest, call_next):
            await srv._ensure_async_state()
            if (srv.api_key is not None and not request.url.path.startswith("/health")
                    and request.headers.get("authorization") != f"Bearer {srv.api_key}"):
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
            return await call_next(request)

        @app.exception_handler(RequestError)
        async def bad_request(request, e):
            return _err(400, str(e))

        @app.exception_handler(RolloutError)
        async def refused(request, e):
            return _err(400, str(e))

        @app.exception_handler(Exception)
        async def internal(request, e):  # the server survives any request
            log.exception("unhandled error on %s", request.url.path)
            return _err(500, f"internal error: {type(e).__name__}: {e}")

        app.post("/generate")(self.generate)
        app.put("/generate")(self.generate)

        @app.get("/health")
        async def health():
            return PlainTextResponse("") if srv.engine.health() else _err(503, "engine failed")

        app.get("/health_generate")(self.health_generate)
        for path in ("/get_model_info", "/model_info"):
            app.get(path)(lambda: JSONResponse(srv.model_info()))
        for path in ("/get_server_info", "/server_info"):
            app.get(path)(lambda: JSONResponse(srv.server_info()))
        app.get("/get_weight_version")(lambda: JSONResponse({"weight_version": srv.engine.weight_version()}))
        app.post("/update_weights_from_disk")(self.update_from_disk)
        app.post("/init_weights_update_group")(self.init_group)
        app.post("/update_weights_from_distributed")(self.update_distributed)
        app.post("/destroy_weights_update_group")(self.destroy_group)
        app.post("/pause_generation")(self.pause)
        app.post("/continue_generation")(self.resume)
        app.api_route("/flush_cache", methods=["GET", "POST"])(self.flush)
        app.post("/abort_request")(self.abort_request)
        app.post("/update_weights_from_tensor")(self.update_from_tensor)
        def memory_route(path: str, release: bool):
            async def handler(request: HTTPRequest):
                return await srv._memory(request, path, release)
            return handler
        for verb, release in (("release", True), ("resume", False)):
            path = f"/{verb}_memory_occupation"
            app.api_route(path, methods=["GET", "POST"])(memory_route(path, release))
        app.get("/v1/loads")(self.loads)
        openai_api.mount(app, srv)
        return app


async def _watch_disconnect(request: HTTPRequest, tasks: list):
    """Cancel (and so abort in the engine) a body's items when its client goes away."""
    while True:
        await asyncio.sleep(1.0)
        if await request.is_disconnected():
            for t in tasks:
                t.cancel()
            return


# ----------------------------------------------------------------------------------------------
# command line


class _ExactRun:
    """``--zero-mismatch``: one item's ``n`` samples by :func:`cascade_jax.rollout.exact.
    generate_exact` (rows of the engine's ``max_len``; sample ``k`` of seed ``s`` draws token
    ``t`` with ``fold_in(key(sample_seed(s, k)), t)``, the engine's rule) on a worker thread, with
    the engine's current weights; the same ``result`` / ``rid`` surface as an engine handle."""

    def __init__(self, engine, item, loop, on_done):
        self.rid, self._samples = item.rid, None
        sp = item.sampling
        seed = int(sp.seed) if sp.seed is not None else int(np.random.randint(0, 2 ** 31 - 1))

        def work():
            from .exact import generate_exact
            self._samples = tuple(generate_exact(
                engine.params(), engine.model_cfg, [list(item.prompt_ids)] * sp.n, row_len=engine.max_len,
                num_slots=engine.num_slots, max_new_tokens=sp.max_new_tokens, seed=seed,
                temperature=sp.temperature, stop_token_ids=sp.stop_token_ids,
                return_routed_experts=item.return_routed_experts,
                weight_version=engine.weight_version()))
            return self

        self._future = loop.run_in_executor(None, work)
        self._future.add_done_callback(lambda f: on_done(self))

    def result(self, timeout=None):
        self._future.result()  # raises what generate_exact raised
        return self._samples


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="JAX rollout server speaking SGLang's HTTP protocol")
    ap.add_argument("--checkpoint", required=True, help="Hub-layout NemotronH checkpoint directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every endpoint")
    ap.add_argument("--served-model-name", default=None, help="the model id of /v1/models (default: --checkpoint)")
    ap.add_argument("--weight-version", default="default", help="label of the initial weights")
    ap.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                    help="weight dtype (auto: as stored)")
    ap.add_argument("--num-slots", type=int, default=8, help="sequences decoded together")
    ap.add_argument("--max-len", type=int, default=2048, help="context length per slot (prompt + response)")
    ap.add_argument("--prompt-buckets", default=None, help="comma-separated padded prompt lengths")
    ap.add_argument("--prefill-sizes", default=None, help="comma-separated admission row counts")
    ap.add_argument("--steps-per-call", type=int, default=4, help="tokens decoded per jitted call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mesh", default=None,
                    help="the engine's mesh over this node's devices, axis:size,... over data, fsdp, expert, "
                         "tensor (e.g. tensor:4,expert:2); weights and caches are sharded by the rules table "
                         "(default: one device)")
    ap.add_argument("--a2a", choices=["auto", "ragged", "padded"], default="auto",
                    help="expert-parallel token exchange with an expert axis (auto: ragged on GPU/TPU, padded on CPU)")
    ap.add_argument("--enable-return-routed-experts", action="store_true",
                    help="record the experts of every token and MoE layer, so /generate can return them "
                         "(return_routed_experts)")
    ap.add_argument("--keep-sessions", action="store_true",
                    help="keep a finished sample's cache under its /generate session_params.id; the "
                         "session's next prompt prefills only the tokens after its kept row (multi-turn)")
    ap.add_argument("--zero-mismatch", action="store_true",
                    help="the zero-mismatch engine (rollout.exact.ExactEngine): sampling log-probs equal "
                         "those of a trainer using models.nemotron_h.invariant bit for bit; --max-len a "
                         "multiple of 16; no top-p/top-k")
    ap.add_argument("--warmup", action="store_true",
                    help="compile every prompt bucket x prefill size and scoring length before serving "
                         "(default: each program compiles on first use, served from the persistent cache "
                         "afterwards)")
    ap.add_argument("--no-warmup", action="store_true", help="(the default; kept for old command lines)")
    ap.add_argument("--compilation-cache-dir", default=None,
                    help="persistent XLA compilation cache (default: $JAX_COMPILATION_CACHE_DIR, else "
                         "~/.cache/cascade-jax/xla; '' disables it)")
    ap.add_argument("--update-timeout-s", type=float, default=600.0)
    ap.add_argument("--update-buffers", type=int, default=None,
                    help="host memory slabs that disk weight updates read into and reuse (double-buffering: a "
                         "new version goes into the slab of the version before last, already touched; one spare "
                         "is touched in the background after start-up); default 2 on the CPU backend without "
                         "--mesh (where the weights live in host memory), else 0 (fresh buffers each update)")
    ap.add_argument("--log-level", default="warning")
    return ap


def _ints(text: Optional[str], flag: str):
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise _Exit(2, f"{flag}: expected comma-separated integers, got {text!r}") from None


class _Exit(Exception):
    """A start-up failure: one ``error: ...`` line and the project's exit code (README: 2 config,
    3 missing file, 5 checkpoint, 6 rollout server)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def _compilation_cache(flag: Optional[str]) -> Optional[str]:
    """Turn on JAX's persistent compilation cache (content-addressed, shared between runs), so a
    restarted server loads its programs instead of compiling them."""
    import os
    path = flag if flag is not None else os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "cascade-jax", "xla")
    if not path:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def _serve(args) -> None:
    import threading

    import uvicorn
    from models import nemotron_h as nh
    from .engine import JaxEngine

    t_start = time.perf_counter()
    cache_dir = _compilation_cache(args.compilation_cache_dir)
    dtype = None if args.dtype == "auto" else args.dtype
    mesh = sharding = None
    if args.mesh is not None:
        try:
            mesh = engine_mesh(args.mesh, field="--mesh")
        except ShardingError as e:
            raise _Exit(2, str(e)) from None
    if not Path(args.checkpoint).exists():
        raise _Exit(3, f"--checkpoint {args.checkpoint}: no such directory")
    if mesh is not None:  # each device reads only its slices of the checkpoint
        try:
            sharding = param_shardings(nh.ModelConfig.from_json_file(Path(args.checkpoint) / "config.json"), mesh)
        except ShardingError as e:
            raise _Exit(2, f"--mesh {args.mesh}: {e}") from None
        except (OSError, ValueError) as e:
            raise _Exit(5, f"--checkpoint {args.checkpoint}: config.json: {e}") from None
    n_slabs = args.update_buffers if args.update_buffers is not None else (
        2 if mesh is None and jax.default_backend() == "cpu" else 0)
    if n_slabs < 0 or (n_slabs and mesh is not None):
        raise _Exit(2, f"--update-buffers {n_slabs}: must be >= 0, and 0 with --mesh (sharded loads read slices)")
    host_buffers = HostBuffers(n_slabs) if n_slabs else None
    try:
        model_cfg, params = nh.load_checkpoint(args.checkpoint, dtype=dtype, sharding=sharding,
                                               host_buffers=host_buffers)
    except (nh.CheckpointError, OSError, ValueError) as e:
        raise _Exit(5, f"--checkpoint {args.checkpoint}: {e}") from None
    tokenizer = None
    if (Path(args.checkpoint) / "tokenizer.json").is_file():
        from cascade_jax.data import load_tokenizer
        try:
            tokenizer = load_tokenizer(args.checkpoint)
        except (OSError, ValueError) as e:
            raise _Exit(5, f"--checkpoint {args.checkpoint}: tokenizer: {e}") from None
    engine_cls = ExactEngine if args.zero_mismatch else JaxEngine
    try:
        engine = engine_cls(model_cfg, params, num_slots=args.num_slots, max_len=args.max_len,
                           prompt_buckets=_ints(args.prompt_buckets, "--prompt-buckets"),
                           prefill_sizes=_ints(args.prefill_sizes, "--prefill-sizes"),
                           steps_per_call=args.steps_per_call, weight_version=args.weight_version, seed=args.seed,
                           return_routed_experts=args.enable_return_routed_experts, mesh=mesh, a2a=args.a2a,
                           **({"keep_sessions": True} if args.keep_sessions else {}))
    except ShardingError as e:
        raise _Exit(2, f"--mesh {args.mesh}: {e}") from None
    except ValueError as e:
        raise _Exit(2, str(e)) from None
    del params  # the engine holds them (the start-up slab of host_buffers is free once they are replaced)
    engine.start()
    server_args = {k: v for k, v in vars(args).items() if k != "api_key"}
    srv = RolloutServer(engine, model_cfg, checkpoint=args.checkpoint, dtype=dtype, api_key=args.api_key,
                        tokenizer=tokenizer, server_args=server_args, update_timeout_s=args.update_timeout_s,
                        zero_mismatch=args.zero_mismatch, served_model_name=args.served_model_name,
                        host_buffers=host_buffers)
    t_compile = time.perf_counter()
    if args.warmup:  # compile every generation and scoring shape before serving
        engine.warmup()
        srv.batcher.warmup(engine.max_len)
    t_compile = time.perf_counter() - t_compile
    server = uvicorn.Server(uvicorn.Config(srv.app, host=args.host, port=args.port, log_level=args.log_level,
                                           access_log=False))

    def announce():
        while not server.started and not server.should_exit:
            time.sleep(0.02)
        if server.started:
            what = ("every shape compiled" if args.warmup else "programs compile on first use")
            print(f"ready: serving http://{args.host}:{args.port} (weights {engine.weight_version()!r}; "
                  f"started in {time.perf_counter() - t_start:.1f} s, {t_compile:.1f} s compiling before serving, "
                  f"{what}; compilation cache {cache_dir or 'off'})", flush=True)
            if host_buffers is not None and host_buffers.slabs > 1:  # the next update's slab, touched now
                host_buffers.reserve(engine.params())
    threading.Thread(target=announce, daemon=True).start()
    try:
        server.run()
    finally:
        engine.stop()
        if srv.peer is not None:
            srv.peer.close()
    if not server.started:
        raise _Exit(6, f"--port {args.port}: could not serve on {args.host}:{args.port} (in use?)")


def main(argv=None) -> int:
    """Run the server; returns the exit code (0 after a clean shutdown)."""
    import sys
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    logging.getLogger("cascade_jax").setLevel(args.log_level.upper())  # also when a library configured logging first
    try:
        _serve(args)
    except _Exit as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.code
    return 0
