"""A :class:`RolloutEngine` over HTTP: SGLang 0.5.23 servers, the project's JAX rollout servers
(``launch/serve.py``, same protocol) or an ``sglang-router`` in front of either.

One body per sample (``n = 1``, rid ``{request rid}-{k}``, seed :func:`sglang_api.derive_seed`),
sent with an :mod:`httpx` async client from a private event loop thread, so the trainer calls
plain blocking methods. Every server gets ``max_concurrency`` worker coroutines pulling from one
job queue, so faster servers take more work and a dead server's share moves to the others:

* transport errors, timeouts and 5xx mark the server down (exponential backoff, then a
  ``/health`` probe before it takes work again) and put the job back in the queue;
* ``429`` puts the job back after a backoff; any other 4xx is a :class:`RolloutError`
  (a request the server refuses will not succeed elsewhere);
* a reply with finish reason ``abort`` (the server was paused for a weight update, or the
  request was aborted) is resubmitted, at most ``max_aborts`` times per sample;
* a result is stored once per sample key, so a sample is never lost or counted twice; a job
  failing ``max_retries`` times, or no progress for ``timeout_s``, fails the call.

With ``router_url`` set, ``/generate`` goes through the router and everything the router does
not forward (pause, continue, weight updates, version queries) goes to each of ``urls``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import time
import uuid
from typing import Any, Callable, Optional, Sequence

import httpx

from cascade_jax import domains
from cascade_jax.contract.sampling import SamplingMismatchError, shared_sampling

from . import sglang_api
from .scoring import TopKScores
from .types import Request, RolloutError, Rollouts
from .teachers import score_by_domain

__all__ = ["ServerClient", "ServedTeachers"]


@dataclasses.dataclass
class _Job:
    key: Any
    body: Callable[[int], dict]  # attempt -> body
    decode: Callable[[Any], Any]  # reply JSON -> result (raises RolloutError)
    attempts: int = 0
    aborts: int = 0


@dataclasses.dataclass
class _Server:
    url: str
    failures: int = 0  # consecutive
    down_until: float = 0.0


class ServerClient:
    """Blocking :class:`RolloutEngine` facade over async HTTP.

    Args:
      urls: server base URLs (``http://host:port``); the targets of ``/generate`` unless
        ``router_url`` is given, and always of the per-server admin calls.
      router_url: an ``sglang-router`` URL to send ``/generate`` through.
      api_key: sent as ``Authorization: Bearer <key>`` on every call.
      max_concurrency: in-flight requests per server (the router counts as ``len(urls)`` servers).
      timeout_s: per-request read timeout, and the longest a call may go without any progress.
      connect_timeout_s: TCP connect timeout.
      max_retries: failed attempts (transport / 5xx / 429) per job before the call fails.
      max_aborts: resubmissions of an aborted sample before the call fails.
      backoff_s, max_backoff_s: exponential backoff base and cap between retries.
      syncer: an object with ``update(params, version)`` (``weight_sync.DiskWeightSync`` or
        ``NcclWeightSync``) that :meth:`update_weights` delegates to.
      routed_experts: a model config (or :class:`sglang_api.RoutedLayout`): every body asks for
        ``return_routed_experts`` and every sample carries ``routed_experts [P + R - 1, L_moe, K]``
        decoded from SGLang's ``[P + R - 1, num_hidden_layers, top_k]`` (routing replay).
    """

    def __init__(self, urls: Sequence[str], *, router_url: Optional[str] = None,
                 api_key: Optional[str] = None, max_concurrency: int = 32, timeout_s: float = 600.0,
                 connect_timeout_s: float = 10.0, max_retries: int = 5, max_aborts: int = 20,
                 backoff_s: float = 0.2, max_backoff_s: float = 5.0, syncer=None, routed_experts=None):
        if isinstance(urls, str):
            urls = [urls]
        if not urls:
            raise ValueError("urls: at least one server URL is required")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency: must be >= 1, got {max_concurrency}")
        self.urls = [u.rstrip("/") for u in urls]
        self.router_url = router_url.rstrip("/") if router_url else None
        self.api_key = api_key
        self.max_concurrency = max_concurrency
        self.timeout_s = float(timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.max_retries = max_retries
        self.max_aborts = max_aborts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.syncer = syncer
        self.routed_layout = (routed_experts if routed_experts is None or isinstance(routed_experts, sglang_api.RoutedLayout)
                              else sglang_api.RoutedLayout.of(routed_experts))
        self.stats = {"retries": 0, "resubmitted_aborts": 0}  # over the client's lifetime
        self._ids = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rollout-client", daemon=True)
        self._thread.start()
        self._http = self._run(self._make_http())
        targets = [self.router_url] if self.router_url else self.urls
        self._servers = [_Server(u) for u in targets]

    # ---------------------------------------------------------------------------------------
    # event loop plumbing

    async def _make_http(self) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        conc = self.max_concurrency * len(self.urls)
        return httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s),
            limits=httpx.Limits(max_connections=conc + 8, max_keepalive_connections=conc + 8))

    def _run(self, coro, timeout: Optional[float] = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def close(self) -> None:
        """Close connections and stop the loop thread."""
        if self._loop.is_closed():
            return
        self._run(self._http.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---------------------------------------------------------------------------------------
    # RolloutEngine

    def generate(self, requests: Sequence[Request], *, sessions: Optional[Sequence] = None) -> Rollouts:
        """Sample ``r.sampling.n`` responses per request (one HTTP body per sample).
        ``sessions``: per request a session id (or None), sent as ``session_params.id``
        (JAX servers with ``--keep-sessions``; the request must have ``n = 1``)."""
        if sessions is not None and len(sessions) != len(requests):
            raise ValueError(f"sessions: {len(sessions)} for {len(requests)} requests")
        call = f"c{next(self._ids)}-{uuid.uuid4().hex[:6]}"
        jobs = []
        for i, r in enumerate(requests):
            base = r.rid or f"{call}-{i}"
            for k in range(r.sampling.n):
                def body(attempt, r=r, k=k, base=base):
                    return sglang_api.encode_generate(r.prompt_ids, r.sampling, rid=f"{base}-{k}-a{attempt}", k=k,
                                                      return_routed_experts=self.routed_layout is not None,
                                                      session=None if sessions is None else sessions[i])
                jobs.append(_Job((i, k), body, lambda reply, r=r: sglang_api.decode_sample(
                    reply, r.prompt_ids, self.routed_layout)))
        results = self._run(self._execute(jobs))
        groups = tuple(tuple(results[(i, k)] for k in range(r.sampling.n)) for i, r in enumerate(requests))
        return Rollouts(requests=tuple(requests), groups=groups)

    def score(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *,
              topk: int = 0) -> list:
        """Teacher-forced log-probs by ``/generate`` with ``max_new_tokens: 0``,
        ``return_logprob`` and ``logprob_start_len: 0`` (the last ``len(response)`` entries of
        ``input_token_logprobs``), at temperature 1. ``topk > 0`` also asks
        ``top_logprobs_num: topk`` and returns a
        :class:`~cascade_jax.rollout.scoring.TopKScores` per pair (each response position's
        ``topk`` most likely tokens, from ``input_top_logprobs``)."""
        return self.score_with_version(prompts, responses, topk=topk)[0]

    def score_with_version(self, prompts, responses, *, urls: Optional[Sequence[str]] = None,
                           topk: int = 0) -> tuple[list, list]:
        """:meth:`score` plus the ``weight_version`` each pair was scored with; ``urls`` (a
        subset of the servers) bypasses the router, e.g. to verify each server."""
        if len(prompts) != len(responses):
            raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        call = f"s{next(self._ids)}-{uuid.uuid4().hex[:6]}"
        jobs = []
        for j, (p, r) in enumerate(zip(prompts, responses)):
            if len(p) < 1:
                raise ValueError(f"score: prompt {j} is empty (the first token has no log-prob)")
            jobs.append(_Job(j, lambda a, p=p, r=r, j=j: sglang_api.encode_score(
                p, r, rid=f"{call}-{j}-a{a}", top_logprobs_num=topk),
                lambda reply, p=p, r=r: sglang_api.decode_score(reply, len(p), len(r), topk=topk)))
        results = self._run(self._execute(jobs, urls))
        scores = [results[j][0] if not topk else TopKScores(*results[j][:3]) for j in range(len(jobs))]
        return scores, [results[j][-1] for j in range(len(jobs))]

    def update_weights(self, params, version: str) -> None:
        """Push ``params`` as ``version`` through the configured weight syncer."""
        if self.syncer is None:
            raise RolloutError("update_weights: this client has no weight syncer (rollout.sync)")
        self.syncer.update(params, version)

    def weight_version(self) -> str:
        """The servers' common ``weight_version`` (they must agree)."""
        versions = self.versions()
        if len(set(versions.values())) != 1:
            raise RolloutError(f"servers disagree on weight_version: {versions}")
        return next(iter(versions.values()))

    def health(self) -> bool:
        """True when every server (and the router, if any) answers ``/health`` with 200."""
        targets = self.urls + ([self.router_url] if self.router_url else [])

        async def one(u):
            try:
                return (await self._http.get(u + "/health", timeout=self.connect_timeout_s)).status_code == 200
            except httpx.HTTPError:
                return False

        async def all_():
            return all(await asyncio.gather(*(one(u) for u in targets)))
        return self._run(all_())

    # ---------------------------------------------------------------------------------------
    # per-server admin calls (never through the router)

    def check_server_args(self, **expected) -> None:
        """Every server's ``/server_info`` reports each ``key: value`` of ``expected``
        (:class:`RolloutError` naming the server and the first differing key)."""
        for u, info in self.call_all("GET", "/server_info").items():
            for k, v in expected.items():
                got = info.get(k) if isinstance(info, dict) else None
                if got != v:
                    raise RolloutError(f"{u}/server_info: {k} is {got!r}, expected {v!r}")

    def versions(self) -> dict:
        """``{url: weight_version}`` from ``/get_weight_version`` of every server."""
        replies = self.call_all("GET", "/get_weight_version")
        out = {}
        for u, r in replies.items():
            v = r.get("weight_version") if isinstance(r, dict) else None
            if not isinstance(v, str):
                raise RolloutError(f"{u}/get_weight_version: bad reply {r!r}")
            out[u] = v
        return out

    def call_all(self, method: str, path: str, body: Any = None, *, timeout_s: Optional[float] = None,
                 ok: Sequence[int] = (200,), retry_status: Sequence[int] = (), retries: int = 0,
                 urls: Optional[Sequence[str]] = None) -> dict:
        """``method path`` on every server concurrently; ``{url: reply JSON (or text)}``. A status
        in ``retry_status`` is retried up to ``retries`` times (1 s apart); any other status not
        in ``ok`` or a transport error raises :class:`RolloutError` naming the server."""
        urls = list(urls if urls is not None else self.urls)
        timeout = self.timeout_s if timeout_s is None else timeout_s

        async def one(u):
            for attempt in itertools.count():
                try:
                    resp = await self._http.request(method, u + path, json=body, timeout=timeout)
                except httpx.HTTPError as e:
                    raise RolloutError(f"{u}{path}: {type(e).__name__}: {e}") from None
                if resp.status_code in retry_status and attempt < retries:
                    await asyncio.sleep(1.0)
                    continue
                if resp.status_code not in ok:
                    raise RolloutError(f"{u}{path}: HTTP {resp.status_code}: {resp.text[:500]}")
                try:
                    return resp.json()
                except ValueError:
                    return resp.text

        async def all_():
            res = await asyncio.gather(*(one(u) for u in urls), return_exceptions=True)
            errs = [r for r in res if isinstance(r, BaseException)]
            if errs:
                raise RolloutError("; ".join(str(e) for e in errs))
            return dict(zip(urls, res))
        return self._run(all_())

    # ---------------------------------------------------------------------------------------
    # the job runner

    def _backoff(self, n: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** max(0, n - 1))

    async def _execute(self, jobs: list, urls: Optional[Sequence[str]] = None) -> dict:
        if not jobs:
            return {}
        servers = self._servers if urls is None else [_Server(u.rstrip("/")) for u in urls]
        queue: asyncio.Queue = asyncio.Queue()
        for j in jobs:
            queue.put_nowait(j)
        results: dict = {}
        state = {"error": None, "progress": time.monotonic()}
        done = asyncio.Event()
        per_server = self.max_concurrency * (len(self.urls) if self.router_url and urls is None else 1)

        def finish_job(job, value):
            if job.key not in results:  # one result per sample key, never two
                results[job.key] = value
            state["progress"] = time.monotonic()
            if len(results) == len(jobs):
                done.set()

        def fail(msg):
            if state["error"] is None:
                state["error"] = RolloutError(msg)
            done.set()

        async def wait_up(server):
            while server.down_until > time.monotonic() and not done.is_set():
                await asyncio.sleep(min(0.1, server.down_until - time.monotonic()))
            if server.failures and not done.is_set():  # probe before taking work again
                try:
                    r = await self._http.get(server.url + "/health", timeout=self.connect_timeout_s)
                    healthy = r.status_code == 200
                except httpx.HTTPError:
                    healthy = False
                if not healthy:
                    server.failures += 1
                    server.down_until = time.monotonic() + self._backoff(server.failures)
                    return False
            return True

        def retry(job, server, why, *, server_fault):
            job.attempts += 1
            self.stats["retries"] += 1
            if server_fault:
                server.failures += 1
                server.down_until = time.monotonic() + self._backoff(server.failures)
            if job.attempts > self.max_retries:
                fail(f"request {job.key} failed {job.attempts} times; last on {server.url}: {why}")
            else:
                queue.put_nowait(job)

        async def worker(server):
            while not done.is_set():
                if not await wait_up(server):
                    continue
                job = await queue.get()
                if server.down_until > time.monotonic():  # went down while this worker waited
                    queue.put_nowait(job)
                    continue
                if job.attempts:
                    await asyncio.sleep(self._backoff(job.attempts))
                try:
                    resp = await self._http.post(server.url + "/generate", json=job.body(job.attempts + job.aborts))
                except httpx.HTTPError as e:
                    retry(job, server, f"{type(e).__name__}: {e}", server_fault=True)
                    continue
                if resp.status_code >= 500:
                    retry(job, server, f"HTTP {resp.status_code}: {resp.text[:300]}", server_fault=True)
                    continue
                if resp.status_code == 429:
                    retry(job, server, "HTTP 429", server_fault=False)
                    continue
                if resp.status_code != 200:
                    fail(f"{server.url}/generate refused request {job.key}: HTTP {resp.status_code}: "
                         f"{resp.text[:500]}")
                    continue
                server.failures = 0
                try:
                    reply = resp.json()
                    meta = reply[0]["meta_info"] if isinstance(reply, list) else reply["meta_info"]
                    aborted = meta["finish_reason"]["type"] == "abort"
                except (ValueError, KeyError, IndexError, TypeError):
                    fail(f"{server.url}/generate: bad reply for {job.key}: {resp.text[:300]}")
                    continue
                if aborted:
                    job.aborts += 1
                    self.stats["resubmitted_aborts"] += 1
                    if job.aborts > self.max_aborts:
                        fail(f"request {job.key} aborted {job.aborts} times (last on {server.url})")
                    else:
                        await asyncio.sleep(self.backoff_s)
                        queue.put_nowait(job)
                    continue
                try:
                    finish_job(job, job.decode(reply))
                except RolloutError as e:
                    fail(f"{server.url}: {e}")

        async def watchdog():
            while not done.is_set():
                await asyncio.sleep(0.5)
                if time.monotonic() - state["progress"] > self.timeout_s:
                    fail(f"no request finished for {self.timeout_s:.0f} s ({len(results)}/{len(jobs)} done; "
                         f"servers: {[(s.url, s.failures) for s in servers]})")

        tasks = [asyncio.ensure_future(worker(s)) for s in servers for _ in range(per_server)]
        tasks.append(asyncio.ensure_future(watchdog()))
        try:
            await done.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if state["error"] is not None:
            raise state["error"]
        return results


class ServedTeachers:
    """MOPD teachers behind rollout servers: every sample scored teacher-forced
    (:meth:`ServerClient.score`) by the servers of its request's domain, with the same
    ``score(rollouts)`` contract as the in-process ``teachers.Teachers``: per sample
    (``rollouts.samples()`` order) the ``[R]`` float32 teacher log-probs. ``by_domain`` maps a
    domain to a :class:`ServerClient` (or a server URL / list of URLs; clients made from URLs
    get ``client_kwargs``). A sample without a domain, or of a domain without a teacher, is a
    ``ValueError`` naming it."""

    def __init__(self, by_domain: dict, **client_kwargs):
        if not by_domain:
            raise ValueError("teachers: at least one domain -> teacher server is required")
        made: dict = {}
        self.by_domain = {}
        for d, c in by_domain.items():
            domains.check_domain(d)
            if not isinstance(c, ServerClient):
                key = (c,) if isinstance(c, str) else tuple(c)
                if key not in made:
                    made[key] = ServerClient(list(key), **client_kwargs)
                c = made[key]
            self.by_domain[d] = c
        self._owned = list(made.values())

    def score(self, rollouts: Rollouts, *, topk: int = 0) -> list:
        """Per sample the teacher log-probs at temperature 1: servers' prompt log-probs are
        always at temperature 1 (docs/rollout-protocol.md §3), so rollouts sampled at another
        temperature (the sampling contract's) are refused rather than scored inconsistently.
        ``topk > 0``: a :class:`~cascade_jax.rollout.scoring.TopKScores` per sample (the
        servers' ``input_top_logprobs``; MOPD's forward-KL term), as the in-process teachers'."""
        if rollouts.requests:
            tau = shared_sampling([r.sampling for r in rollouts.requests], what="served teachers")
            if tau.logprob_temperature != 1.0:
                raise SamplingMismatchError(
                    f"served teachers: servers score at temperature 1, the rollouts were sampled at "
                    f"temperature {tau.temperature}; use in-process teachers (stage.teachers) or "
                    f"rollout.sampling.temperature 1")
        return score_by_domain(rollouts, self.by_domain,
                               lambda client, prompts, responses: client.score(prompts, responses,
                                                                               topk=topk))

    def close(self) -> None:
        """Close the clients this object made from URLs."""
        for c in self._owned:
            c.close()
