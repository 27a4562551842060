"""The JAX rollout server: :class:`~cascade_jax.rollout.engine.JaxEngine` behind FastAPI/uvicorn,
speaking SGLang 0.5.23's HTTP protocol for what an RL trainer uses (docs/rollout-protocol.md §2-5;
shapes in :mod:`cascade_jax.rollout.sglang_api`), so a trainer, ``sglang-router`` or any SGLang
client cannot tell it from an SGLang server.

    python launch/serve.py --checkpoint DIR [--host 127.0.0.1] [--port 30000] [--api-key K]

Endpoints: ``/generate``, ``/health``, ``/health_generate``, ``/get_model_info`` (``/model_info``),
``/get_server_info`` (``/server_info``), ``/get_weight_version``, ``/update_weights_from_disk``,
``/init_weights_update_group``, ``/update_weights_from_distributed``,
``/destroy_weights_update_group``, ``/pause_generation``, ``/continue_generation``,
``/flush_cache``, ``/abort_request``.

Behaviour:

* Every request of a ``/generate`` body is submitted to the engine's continuous batch (``n``
  samples of one item form one engine request, sample ``i`` seeded ``(sampling_seed, i)``).
  ``return_logprob`` with ``logprob_start_len >= 0`` adds the prompt's teacher-forced
  log-probs (engine ``score``; concurrent scoring calls are batched). ``max_new_tokens: 0``
  is pure scoring.
* ``--zero-mismatch``: each item's samples come from :func:`cascade_jax.rollout.exact.
  generate_exact` over rows of ``--max-len`` tokens with the current weights (a trainer using
  ``row_len = --max-len`` recomputes the log-probs bit for bit); top-p < 1 / top-k are refused.
* ``return_routed_experts: true`` adds ``meta_info.routed_experts`` (base64 of int32
  ``[P + R - 1, L_moe, K]``, SGLang's layout: the experts prefill and decode routed each fed
  token to); the server must run with ``--enable-return-routed-experts``, else a 400 naming
  the field.
* Pause (``mode`` ``abort``, the default, or ``in_place``/``retract``) stops the engine; ``abort``
  also finishes every running request with finish reason ``abort`` (clients resubmit). New
  ``/generate`` requests wait until ``/continue_generation``.
* A weight update (disk or distributed) waits until no request is in flight (new ones wait),
  loads and validates the new weights completely before swapping, and requires a new
  ``weight_version``; a missing, corrupt or mismatched checkpoint is refused with 400 and the
  previous version keeps serving. ``/flush_cache`` answers 400 while requests run or wait.
* Distributed updates: ``/init_weights_update_group`` starts this server's torch.distributed
  peer (:mod:`torch_peer`, own process with torch) at rank ``rank_offset``; each
  ``/update_weights_from_distributed`` receives its tensors (one flat broadcast per bucket with
  ``load_format: "flattened_bucket"``, else one per tensor) into shared memory and stages them;
  when every Hub tensor of the model has arrived the new params are swapped in at once.
* ``--api-key``: every endpoint but the health probes (``/health``, ``/health_generate``, which
  SGLang also leaves open so routers and orchestrators can probe) requires
  ``Authorization: Bearer <key>`` (401 otherwise).
  Malformed JSON, unknown fields, wrong types and out-of-range values are 400 with a message
  naming the field; no request can take the server down.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse

from . import sglang_api
from .sglang_api import RequestError
from .types import Request, RolloutError

__all__ = ["RolloutServer", "build_parser", "main"]

log = logging.getLogger("cascade_jax.rollout.server")


def _err(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=status)


def _update_reply(ok: bool, message: str, status: Optional[int] = None, **extra) -> JSONResponse:
    return JSONResponse({"success": ok, "message": message, **extra},
                        status_code=status if status is not None else (200 if ok else 400))


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
                 zero_mismatch: bool = False):
        self.engine = engine
        self.zero_mismatch = bool(zero_mismatch)
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
        self.staged: dict = {}
        self.hub_shapes = self._hub_shapes()
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

    async def _run_item(self, item: sglang_api.GenerateItem, loop) -> list:
        t0 = time.perf_counter()
        fut = loop.create_future()

        def on_done(h):
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(h))

        if self.zero_mismatch:
            handle = _ExactRun(self.engine, item, loop, on_done)
        else:
            handle = self.engine.submit(Request(prompt_ids=item.prompt_ids, sampling=item.sampling,
                                                rid=item.rid), on_done=on_done)
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
        samples = handle.result(0)
        n = item.sampling.n
        out = []
        for k, s in enumerate(samples):
            resp = [int(t) for t in s.response_ids]
            out.append(sglang_api.generate_item_reply(
                rid=item.rid if n == 1 else f"{item.rid}-{k}", prompt_ids=item.prompt_ids, output_ids=resp,
                output_logprobs=[float(x) for x in s.logprobs] if item.return_logprob else None,
                finish_reason=s.finish_reason, matched=resp[-1] if s.finish_reason == "stop" and resp else None,
                max_new_tokens=item.sampling.max_new_tokens, weight_version=s.weight_version,
                input_logprobs=input_lps, logprob_start_len=item.logprob_start_len,
                e2e_latency=time.perf_counter() - t0,
                routed_experts=s.routed_experts if item.return_routed_experts else None,
                text=self.tokenizer.decode(resp) if self.tokenizer is not None else ""))
        return out

    async def generate(self, request: HTTPRequest):
        body = await _json(request)
        items, batched = sglang_api.parse_generate(
            body, vocab_size=self._vocab(), context_length=self.engine.max_len,
            tokenize=(lambda t: [int(x) for x in self.tokenizer.encode(t)]) if self.tokenizer is not None else None,
            new_rid=lambda: uuid.uuid4().hex)
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
        if not self.gate.is_set():
            self.waiting += 1
            try:
                await self.gate.wait()
            finally:
                self.waiting -= 1
        self.inflight += len(items)
        loop = asyncio.get_running_loop()
        tasks = [asyncio.ensure_future(self._run_item(it, loop)) for it in items]
        watch = asyncio.ensure_future(_watch_disconnect(request, tasks))
        try:
            results = await asyncio.gather(*tasks)
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

    # ------------------------------------------------------------------------------------------
    # weights

    async def _swap(self, params, version: str, what: str) -> None:
        """Close the gate, wait for in-flight requests, swap, reopen (unless paused)."""
        self.gate.clear()
        try:
            await self._drain(what)
            await asyncio.to_thread(self.engine.update_weights, params, version, timeout=self.update_timeout_s)
        finally:
            if not self.paused:
                self.gate.set()

    def _check_version(self, body: dict) -> str:
        from .engine import check_version_order
        v = body.get("weight_version")
        if not isinstance(v, str) or not v:
            raise RequestError("weight_version", "required (a non-empty string): the JAX rollout server labels "
                                                 "every update")
        try:
            check_version_order(self.engine.weight_version(), v)
        except RolloutError as e:
            raise RequestError("weight_version", str(e)) from None
        return v

    async def update_from_disk(self, request: HTTPRequest):
        from models import nemotron_h as nh
        body = sglang_api.check_body(await _json(request), "/update_weights_from_disk", required=("model_path",))
        if not isinstance(body["model_path"], str):
            raise RequestError("model_path", f"expected a string, got {body['model_path']!r}")
        for k in ("abort_all_requests", "flush_cache", "is_async", "keep_pause", "torch_empty_cache",
                  "recapture_cuda_graph"):
            if body.get(k) is not None and not isinstance(body[k], bool):
                raise RequestError(k, f"expected a bool, got {body[k]!r}")
        if body.get("load_format") not in (None, "auto", "safetensors"):
            raise RequestError("load_format", f"only 'auto' / 'safetensors' checkpoints, got {body['load_format']!r}")
        async with self.update_lock:
            version = self._check_version(body)
            path = body["model_path"]
            try:
                cfg, params = await asyncio.to_thread(nh.load_checkpoint, path, dtype=self.dtype)
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
            try:
                await self._swap(params, version, "update_weights_from_disk")
            except RolloutError as e:
                return _update_reply(False, f"Failed to update weights: {e}", num_paused_requests=n_aborted)
            self.checkpoint = path
        return _update_reply(True, "Succeeded to update model weights.", num_paused_requests=n_aborted)

    async def init_group(self, request: HTTPRequest):
        from .weight_sync import TorchPeer
        body = sglang_api.check_body(await _json(request), "/init_weights_update_group",
                                     required=("master_address", "master_port", "rank_offset", "world_size"))
        for k in ("master_port", "rank_offset", "world_size"):
            if not sglang_api._is_int(body[k]) or body[k] < (1 if k != "rank_offset" else 0):
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
            self.peer, self.group_name, self.staged = peer, name, {}
        return _update_reply(True, "Succeeded to initialize custom process group.")

    async def update_distributed(self, request: HTTPRequest):
        from models import nemotron_h as nh
        from .weight_sync import NUMPY_DTYPES
        body = sglang_api.check_body(await _json(request), "/update_weights_from_distributed",
                                     required=("names", "dtypes", "shapes"))
        names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not names:
            raise RequestError("names", "expected a non-empty list of tensor names")
        if not isinstance(dtypes, list) or len(dtypes) != len(names):
            raise RequestError("dtypes", f"expected a list of {len(names)} dtype names")
        if not isinstance(shapes, list) or len(shapes) != len(names):
            raise RequestError("shapes", f"expected a list of {len(names)} shapes")
        for i, (d, s) in enumerate(zip(dtypes, shapes)):
            if d not in NUMPY_DTYPES:
                raise RequestError(f"dtypes[{i}]", f"must be one of {sorted(NUMPY_DTYPES)}, got {d!r}")
            if not isinstance(s, list) or not all(sglang_api._is_int(x) and x >= 0 for x in s):
                raise RequestError(f"shapes[{i}]", f"expected a list of non-negative ints, got {s!r}")
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
            if body.get("weight_version") is not None:
                self._check_version(body)
            unknown = [n for n in names if n not in self.hub_shapes]
            if unknown:
                return _update_reply(False, f"unknown tensor {unknown[0]!r} (not a Hub name of this model)")
            self.staged.update(zip(names, arrays))
            version = body.get("weight_version")
            if len(self.staged) < len(self.hub_shapes):
                if version is not None:
                    missing = sorted(set(self.hub_shapes) - set(self.staged))
                    return _update_reply(False, f"weight_version {version!r} given but {len(missing)} tensors were "
                                         f"never sent (first: {missing[0]!r}); the previous weights keep serving")
                return _update_reply(True, f"Staged {len(names)} tensors ({len(self.staged)}/{len(self.hub_shapes)}).")
            staged, self.staged = self.staged, {}
            if version is None:
                return _update_reply(False, "all tensors received but no weight_version: the JAX rollout server "
                                     "labels every update; the previous weights keep serving")
            try:
                params = await asyncio.to_thread(nh.params_from_hub_tensors, staged, self.model_cfg, dtype=self.dtype)
            except (nh.CheckpointError, ValueError) as e:
                return _update_reply(False, f"Failed to load the received weights: {e}")
            if body.get("abort_all_requests"):
                self.engine.abort_all()
            try:
                await self._swap(params, version, "update_weights_from_distributed")
            except RolloutError as e:
                return _update_reply(False, f"Failed to update weights: {e}")
        return _update_reply(True, "Succeeded to update parameter online.")

    def _receive(self, names, dtypes, shapes, fmt) -> list:
        from .weight_sync import NUMPY_DTYPES
        sizes = [int(np.prod(s)) for s in shapes]
        if fmt == "flattened_bucket":
            flat = self.peer.broadcast(dtypes[0], sum(sizes))
            offs = np.cumsum([0] + sizes)
            return [flat[offs[i]:offs[i + 1]].reshape(s) for i, s in enumerate(shapes)]
        return [self.peer.broadcast(d, n).reshape(s) for d, n, s in zip(dtypes, sizes, shapes)]

    async def destroy_group(self, request: HTTPRequest):
        body = sglang_api.check_body(await _json(request), "/destroy_weights_update_group")
        async with self.update_lock:
            if self.peer is None:
                return _update_reply(False, "no weight update group")
            if body.get("group_name") not in (None, self.group_name):
                raise RequestError("group_name", f"unknown group {body['group_name']!r} (have {self.group_name!r})")
            peer, self.peer, self.group_name, self.staged = self.peer, None, None, {}
            await asyncio.to_thread(peer.close)
        return _update_reply(True, "Succeeded to destroy custom process group.")

    # ------------------------------------------------------------------------------------------
    # control

    async def pause(self, request: HTTPRequest):
        body = sglang_api.check_body(await _json(request), "/pause_generation")
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
        sglang_api.check_body(await _json(request), "/continue_generation")
        self.paused = False
        self.engine.resume()
        if not self.update_lock.locked():
            self.gate.set()
        return JSONResponse({"message": "Generation continued successfully.", "status": "ok"})

    async def flush(self, request: HTTPRequest):
        sglang_api.check_body(await _json(request), "/flush_cache")
        if self.inflight or self.waiting or not self.engine.flush_cache():
            return PlainTextResponse("Cache not flushed. Please check there are no running or waiting requests.",
                                     status_code=400)
        return PlainTextResponse("Cache flushed.\nPlease check backend logs for more details. "
                                 "(When there are running or waiting requests, the operation will not be performed.)\n")

    async def abort_request(self, request: HTTPRequest):
        body = sglang_api.check_body(await _json(request), "/abort_request")
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
        return {**self.server_args, "version": "cascade-jax", "model_path": self.checkpoint,
                "weight_version": self.engine.weight_version(), "context_length": self.engine.max_len,
                "num_slots": self.engine.num_slots, "skip_tokenizer_init": self.tokenizer is None,
                "internal_states": [{"num_running": self.engine.num_running(), "num_queued": self.engine.num_queued(),
                                     "paused": self.paused, "inflight": self.inflight}]}

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
        return app


async def _json(request: HTTPRequest) -> Any:
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError("body", f"malformed JSON ({e})") from None


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
    ap.add_argument("--weight-version", default="default", help="label of the initial weights")
    ap.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                    help="weight dtype (auto: as stored)")
    ap.add_argument("--num-slots", type=int, default=8, help="sequences decoded together")
    ap.add_argument("--max-len", type=int, default=2048, help="context length per slot (prompt + response)")
    ap.add_argument("--prompt-buckets", default=None, help="comma-separated padded prompt lengths")
    ap.add_argument("--prefill-sizes", default=None, help="comma-separated admission row counts")
    ap.add_argument("--steps-per-call", type=int, default=4, help="tokens decoded per jitted call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--enable-return-routed-experts", action="store_true",
                    help="record the experts of every token and MoE layer, so /generate can return them "
                         "(return_routed_experts)")
    ap.add_argument("--zero-mismatch", action="store_true",
                    help="sample every token from the trainer's batch-invariant log-probs at rows of "
                         "--max-len (rollout.exact; the trainer uses row_len = --max-len); no top-p/top-k")
    ap.add_argument("--no-warmup", action="store_true", help="compile lazily instead of at start")
    ap.add_argument("--update-timeout-s", type=float, default=600.0)
    ap.add_argument("--log-level", default="warning")
    return ap


def _ints(text: Optional[str], flag: str):
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise SystemExit(f"{flag}: expected comma-separated integers, got {text!r}") from None


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    import uvicorn
    from models import nemotron_h as nh
    from .engine import JaxEngine

    dtype = None if args.dtype == "auto" else args.dtype
    try:
        model_cfg, params = nh.load_checkpoint(args.checkpoint, dtype=dtype)
    except nh.CheckpointError as e:
        raise SystemExit(f"--checkpoint: {e}") from None
    tokenizer = None
    if (Path(args.checkpoint) / "tokenizer.json").is_file():
        from cascade_jax.data import load_tokenizer
        tokenizer = load_tokenizer(args.checkpoint)
    engine = JaxEngine(model_cfg, params, num_slots=args.num_slots, max_len=args.max_len,
                       prompt_buckets=_ints(args.prompt_buckets, "--prompt-buckets"),
                       prefill_sizes=_ints(args.prefill_sizes, "--prefill-sizes"),
                       steps_per_call=args.steps_per_call, weight_version=args.weight_version, seed=args.seed,
                       return_routed_experts=args.enable_return_routed_experts)
    engine.start()
    server_args = {k: v for k, v in vars(args).items() if k != "api_key"}
    srv = RolloutServer(engine, model_cfg, checkpoint=args.checkpoint, dtype=dtype, api_key=args.api_key,
                        tokenizer=tokenizer, server_args=server_args, update_timeout_s=args.update_timeout_s,
                        zero_mismatch=args.zero_mismatch)
    if not args.no_warmup:  # compile every generation and scoring shape before serving
        engine.warmup()
        srv.batcher.warmup(engine.max_len)
    uvicorn.run(srv.app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    engine.stop()
    if srv.peer is not None:
        srv.peer.close()
