"""Push the trainer's weights into rollout servers (SGLang or ``launch/serve.py``), verified.

Two transports behind one framing (docs/rollout-protocol.md §5, §8)::

    check the version  ->  pause every server  ->  transfer  ->  flush (retry its 400)
    ->  continue  ->  every server reports the new weight_version  ->  probe log-probs match

* :class:`DiskWeightSync`: safetensors (``models.nemotron_h.save_checkpoint``) into
  ``{root}/v{version}``, written to a temporary sibling, fsynced and renamed (a crash never
  leaves a half-written version), then ``/update_weights_from_disk`` with ``weight_version`` on
  each server; the last ``keep`` versions are kept, older ones deleted. Layout: the params
  layout (our leaves as held, no transposes: about disk speed) when every server is
  ``launch/serve.py`` (``/server_info`` ``backend: "cascade-jax"``), else the Hub layout that
  SGLang reads.
* :class:`NcclWeightSync`: ``/init_weights_update_group`` once, then per bucket
  ``/update_weights_from_distributed`` (``load_format: "flattened_bucket"``, the version on
  every bucket; the server loads each as it arrives) while a
  torch.distributed peer (:mod:`torch_peer`, its own process with torch; never imported here)
  broadcasts the bucket from rank 0. A bucket holds tensors of one dtype, flattened in list
  order and concatenated with no padding. The trainer hands buckets to the peer through a tmpfs
  file (host arrays; on GPU the same path stages through host memory). ``backend="gloo"``
  runs it on CPU.

Versions: a push must carry a new label (the same label twice is an error), integer labels must
increase, and afterwards every server must report exactly the pushed label (anything else — the
old one, or a jump to another — is an error naming it). The probe: a fixed set of prompt +
response pairs scored teacher-forced by every server must equal the trainer's own log-probs of
the pushed params within ``tol`` (max |Δ log p|). Every remote step has a timeout; a hung peer
is killed and reported.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from cascade_jax.rl.logprobs import token_logprobs
from models import nemotron_h as nh

from .launcher import free_port
from .sglang_api import BACKEND
from .types import RolloutError

__all__ = ["Probe", "make_probe", "reference_logprobs", "write_version", "DiskWeightSync",
           "NcclWeightSync", "TorchPeer", "torch_python", "buckets", "DTYPE_NAMES"]

#: numpy dtype -> the dtype string SGLang's ``dtypes`` field uses (torch's name without ``torch.``)
DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(ml_dtypes.bfloat16): "bfloat16",
               np.dtype(np.float16): "float16"}
NUMPY_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
_VERSION_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
PEER_SCRIPT = Path(__file__).with_name("torch_peer.py")


# --------------------------------------------------------------------------------------------
# Probe: the verification of every sync


@dataclasses.dataclass(frozen=True)
class Probe:
    """Fixed prompt + response pairs (token ids) scored after every sync."""

    prompts: tuple
    responses: tuple


def make_probe(vocab_size: int, *, n: int = 4, prompt_len: int = 6, response_len: int = 6,
               seed: int = 1234) -> Probe:
    """``n`` random pairs (fixed by ``seed``)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(n, prompt_len + response_len))
    return Probe(tuple(tuple(int(t) for t in r[:prompt_len]) for r in ids),
                 tuple(tuple(int(t) for t in r[prompt_len:]) for r in ids))


def reference_logprobs(params, model_cfg, prompts: Sequence[Sequence[int]],
                       responses: Sequence[Sequence[int]]) -> list:
    """The trainer's teacher-forced log-probs ``log π(response[t] | prompt, response[:t])`` at
    temperature 1 (``rl.logprobs.token_logprobs`` over right-padded rows), one ``[R]`` float32
    array per pair."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    T = max(16, 1 << (max(len(s) for s in seqs) - 1).bit_length())  # padded: few compiled shapes
    N = 1 << (len(seqs) - 1).bit_length()
    tokens = np.zeros((N, T), np.int32)
    seg = np.zeros((N, T), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
        seg[i, :len(s)] = 1
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), tokens.shape)
    batch = _Rows(jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg))
    lp = np.asarray(_token_logprobs(params, batch, model_cfg))
    return [lp[i, len(p):len(p) + len(r)].astype(np.float32) for i, (p, r) in enumerate(zip(prompts, responses))]


@functools.partial(jax.jit, static_argnums=(2,))
def _token_logprobs(params, batch, model_cfg):
    return token_logprobs(params, batch, model_cfg)[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Rows:
    tokens: jax.Array
    positions: jax.Array
    segment_ids: jax.Array


# --------------------------------------------------------------------------------------------
# The shared framing


class _Sync:
    """pause -> transfer -> flush -> continue -> verify, for every transport."""

    def __init__(self, client, model_cfg, *, probe: Optional[Probe] = None, tol: float = 1e-3,
                 timeout_s: float = 600.0, flush_retries: int = 60, launcher=None):
        self.client = client
        self.model_cfg = model_cfg
        self.probe = probe if probe is not None else make_probe(model_cfg.vocab_size)
        self.tol = float(tol)
        self.timeout_s = float(timeout_s)
        self.flush_retries = flush_retries
        self.launcher = launcher
        self.version: Optional[str] = None  # last pushed label
        self.last_error: Optional[float] = None  # max |Δ log p| of the last verification
        self.timings: dict = {}  # seconds of the last update (transport-specific parts included)
        self._transfer_timings: dict = {}

    def _check_version(self, version: str) -> None:
        if not isinstance(version, str) or not _VERSION_RE.match(version):
            raise RolloutError(f"weight version {version!r}: must match {_VERSION_RE.pattern}")
        current = self.client.versions()
        if len(set(current.values())) != 1:
            raise RolloutError(f"servers disagree on weight_version before pushing {version!r}: {current}")
        old = next(iter(current.values()))
        if self.version is not None and old != self.version:
            raise RolloutError(f"servers report weight_version {old!r} but the last pushed was {self.version!r}")
        if version == old:
            raise RolloutError(f"weight version {version!r} did not change (servers already serve it)")
        if old.isdigit() and version.isdigit() and int(version) <= int(old):
            raise RolloutError(f"weight version {version!r} goes backwards from {old!r}")

    def update(self, params, version: str) -> None:
        """Push ``params`` as ``version`` and verify it; :class:`RolloutError` on any failure."""
        t0 = time.perf_counter()
        self._check_version(version)
        self.client.call_all("POST", "/pause_generation", {}, timeout_s=self.timeout_s)
        try:
            t1 = time.perf_counter()
            self._transfer(params, version)
            t2 = time.perf_counter()
            self.client.call_all("POST", "/flush_cache", None, timeout_s=self.timeout_s, retry_status=(400,),
                                 retries=self.flush_retries)
        finally:
            self.client.call_all("POST", "/continue_generation", {}, timeout_s=self.timeout_s)
        after = self.client.versions()
        wrong = {u: v for u, v in after.items() if v != version}
        if wrong:
            raise RolloutError(f"after pushing weight version {version!r} servers report {wrong}")
        self.version = version
        self.verify(params)
        self.timings = {**self._transfer_timings, "transfer_s": t2 - t1, "total_s": time.perf_counter() - t0}

    def verify(self, params) -> float:
        """Max |Δ log p| between every server's probe scores and the trainer's; raises when it
        exceeds ``tol``."""
        ref = reference_logprobs(params, self.model_cfg, self.probe.prompts, self.probe.responses)
        worst = 0.0
        for url in self.client.urls:
            got, versions = self.client.score_with_version(self.probe.prompts, self.probe.responses, urls=[url])
            err = max(float(np.max(np.abs(g - r))) for g, r in zip(got, ref))
            if self.version is not None and any(v != self.version for v in versions):
                raise RolloutError(f"{url} scored the probe with weight_version {versions}, expected {self.version!r}")
            if not err <= self.tol:
                raise RolloutError(f"{url}: probe log-probs differ from the trainer's by {err:.3g} > tol {self.tol:g} "
                                   f"(weight version {self.version!r} did not land)")
            worst = max(worst, err)
        self.last_error = worst
        return worst

    def _transfer(self, params, version: str) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# Disk


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_version(params, model_cfg, root, version: str, *, layout: str = "hub") -> Path:
    """Write ``params`` as a checkpoint of ``layout`` (``"hub"`` or ``"params"``,
    ``models.nemotron_h.save_checkpoint``) at ``{root}/v{version}`` atomically (temporary
    sibling, fsynced files, rename, fsynced parent); returns the path."""

    if not _VERSION_RE.match(version):
        raise RolloutError(f"weight version {version!r}: must match {_VERSION_RE.pattern}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"v{version}"
    nh.save_checkpoint(params, dataclasses.replace(model_cfg, hf_source=None), path, layout=layout)
    _fsync_dir(root)
    return path


class DiskWeightSync(_Sync):
    """Disk transport (see module doc). ``root`` must be visible to every server. ``layout``:
    ``"auto"`` (params layout when every server reports ``backend: "cascade-jax"`` in
    ``/server_info``, else Hub; asked once), ``"hub"`` or ``"params"``."""

    def __init__(self, client, model_cfg, root, *, keep: int = 2, layout: str = "auto", **kw):
        super().__init__(client, model_cfg, **kw)
        if keep < 1:
            raise ValueError(f"keep: must be >= 1, got {keep}")
        if layout not in ("auto", "hub", "params"):
            raise ValueError(f"layout: must be 'auto', 'hub' or 'params', got {layout!r}")
        self.root = Path(root)
        self.keep = keep
        self.layout = layout
        self.paths: list = []  # pushed version directories, oldest first

    def _layout(self) -> str:
        if self.layout == "auto":
            infos = self.client.call_all("GET", "/server_info", timeout_s=self.timeout_s)
            ours = all(isinstance(i, dict) and i.get("backend") == BACKEND for i in infos.values())
            self.layout = "params" if ours else "hub"
        return self.layout

    def _transfer(self, params, version: str) -> None:
        layout = self._layout()
        t0 = time.perf_counter()
        path = write_version(params, self.model_cfg, self.root, version, layout=layout)
        t1 = time.perf_counter()
        body = {"model_path": str(path), "weight_version": version, "flush_cache": True}
        self.client.call_all("POST", "/update_weights_from_disk", body, timeout_s=self.timeout_s)
        self._transfer_timings = {"write_s": t1 - t0, "load_s": time.perf_counter() - t1}
        self.paths.append(path)
        if self.launcher is not None:
            self.launcher.set_checkpoint(str(path), version)
        while len(self.paths) > self.keep:
            shutil.rmtree(self.paths.pop(0), ignore_errors=True)


# --------------------------------------------------------------------------------------------
# torch.distributed peer (own process) and the NCCL / gloo transport


def torch_python() -> str:
    """An interpreter with torch for :mod:`torch_peer`: ``$CASCADE_TORCH_PYTHON``, else
    ``$CASCADE_ORACLE_PYTHON``, else ``.oracle-venv/bin/python`` in the repository."""
    for var in ("CASCADE_TORCH_PYTHON", "CASCADE_ORACLE_PYTHON"):
        if os.environ.get(var):
            return os.environ[var]
    return str(Path(__file__).resolve().parents[2] / ".oracle-venv" / "bin" / "python")


def _shm_dir() -> Optional[str]:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class TorchPeer:
    """Drive one :mod:`torch_peer` process (rank ``rank`` of a ``world_size`` group)."""

    def __init__(self, *, init_method: str, rank: int, world_size: int, group_name: str = "weight_update_group",
                 backend: str = "nccl", timeout_s: float = 600.0, python: Optional[str] = None):
        self.timeout_s = timeout_s
        self.rank = rank
        py = python or torch_python()
        if not os.access(py, os.X_OK):
            raise RolloutError(f"torch interpreter {py!r} not found (set CASCADE_TORCH_PYTHON)")
        self.proc = subprocess.Popen(
            [py, "-I", str(PEER_SCRIPT), "--init", init_method, "--rank", str(rank), "--world-size", str(world_size),
             "--group-name", group_name, "--backend", backend, "--timeout-s", str(timeout_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self._lines: queue.Queue = queue.Queue()
        self._stderr: list = []
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=lambda: self._stderr.extend(self.proc.stderr), daemon=True).start()
        self._lock = threading.Lock()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _reply(self, what: str, timeout_s: float) -> dict:
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            self.close(kill=True)
            raise RolloutError(f"torch peer rank {self.rank}: {what} timed out after {timeout_s:.0f} s") from None
        if line is None:
            time.sleep(0.2)
            raise RolloutError(f"torch peer rank {self.rank} exited during {what}: {''.join(self._stderr)[-2000:]}")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise RolloutError(f"torch peer rank {self.rank}: {what}: {reply.get('error')}")
        return reply

    def wait_ready(self, timeout_s: Optional[float] = None) -> None:
        self._reply("joining the group", self.timeout_s if timeout_s is None else timeout_s)

    def broadcast(self, dtype: str, numel: int, data: Optional[np.ndarray] = None) -> np.ndarray:
        """One broadcast from rank 0 of ``numel`` elements of ``dtype``: rank 0 passes ``data``
        (flat), the others get the received array back."""
        npdt = NUMPY_DTYPES[dtype]
        with self._lock, tempfile.NamedTemporaryFile(dir=_shm_dir(), prefix="wsync-") as f:
            if data is not None:
                data = np.ascontiguousarray(data, npdt).reshape(-1)
                if data.size != numel:
                    raise ValueError(f"broadcast: data has {data.size} elements, expected {numel}")
                f.write(data.view(np.uint8).data)
                f.flush()
            else:
                f.truncate(numel * npdt.itemsize)
            self.proc.stdin.write(json.dumps({"op": "broadcast", "file": f.name, "dtype": dtype,
                                              "numel": int(numel)}) + "\n")
            self.proc.stdin.flush()
            self._reply(f"broadcast of {numel} x {dtype}", self.timeout_s)
            if data is not None:
                return data
            f.seek(0)
            return np.frombuffer(f.read(), dtype=npdt)

    def close(self, kill: bool = False) -> None:
        if self.proc.poll() is None:
            if not kill:
                try:
                    self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                    self.proc.stdin.flush()
                    self.proc.wait(10)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)


def buckets(params, model_cfg, bucket_bytes: int):
    """Yield the Hub tensors of ``params`` in single-dtype buckets of at most ``bucket_bytes`` (a
    larger tensor gets a bucket of its own): ``(dtype name, [(name, shape, array)])``. Tensors
    are produced one at a time and a bucket is yielded as soon as it is full, so at most one
    open bucket per dtype is on the host."""

    open_: dict = {}  # dtype name -> [bytes, items]
    for name, nbytes, produce in nh.hub_tensors(params, model_cfg):
        arr = produce()
        dt = DTYPE_NAMES[arr.dtype]
        b = open_.get(dt)
        if b is not None and b[0] + nbytes > bucket_bytes:
            yield dt, b[1]
            b = None
        if b is None:
            b = open_[dt] = [0, []]
        b[0] += nbytes
        b[1].append((name, tuple(arr.shape), arr))
    for dt, b in open_.items():
        if b[1]:
            yield dt, b[1]


class NcclWeightSync(_Sync):
    """torch.distributed broadcast transport (see module doc). The trainer's peer is rank 0 of a
    group of ``1 + len(client.urls)`` ranks; server ``i`` joins with ``rank_offset = 1 + i``
    (one rank per server: the JAX server, or an SGLang server with tensor parallelism 1)."""

    def __init__(self, client, model_cfg, *, master_address: str = "127.0.0.1", master_port: Optional[int] = None,
                 backend: str = "nccl", group_name: str = "weight_update_group", bucket_bytes: int = 512 << 20,
                 python: Optional[str] = None, **kw):
        super().__init__(client, model_cfg, **kw)
        self.master_address = master_address
        self.master_port = master_port or free_port()
        self.backend = backend
        self.group_name = group_name
        self.bucket_bytes = bucket_bytes
        self.python = python
        self.peer: Optional[TorchPeer] = None
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="nccl-sync")

    def connect(self) -> None:
        """Create the group: start rank 0 and ask every server to join (concurrently)."""
        world = 1 + len(self.client.urls)
        self.peer = TorchPeer(init_method=f"tcp://{self.master_address}:{self.master_port}", rank=0,
                              world_size=world, group_name=self.group_name, backend=self.backend,
                              timeout_s=self.timeout_s, python=self.python)

        def join(i_url):
            i, url = i_url
            body = {"master_address": self.master_address, "master_port": self.master_port, "rank_offset": 1 + i,
                    "world_size": world, "group_name": self.group_name, "backend": self.backend}
            return self.client.call_all("POST", "/init_weights_update_group", body, timeout_s=self.timeout_s,
                                        urls=[url])
        futs = [self._pool.submit(join, iu) for iu in enumerate(self.client.urls)]
        try:
            self.peer.wait_ready()
            for f in futs:
                f.result(timeout=self.timeout_s)
        except BaseException:
            self.peer.close(kill=True)
            self.peer = None
            raise

    def _transfer(self, params, version: str) -> None:
        if self.peer is None:
            self.connect()
        pending = None
        for bucket in buckets(params, self.model_cfg, self.bucket_bytes):
            if pending is not None:
                self._send(*pending, version=version, last=False)
            pending = bucket
        self._send(*pending, version=version, last=True)

    def _send(self, dt: str, items: list, *, version: str, last: bool) -> None:
        """One bucket; every bucket carries the version (as slime sends it: SGLang loads each
        bucket as it arrives), the last one also flushes the cache."""
        body = {"names": [n for n, _, _ in items], "dtypes": [dt] * len(items),
                "shapes": [list(s) for _, s, _ in items], "group_name": self.group_name,
                "load_format": "flattened_bucket", "flush_cache": last, "weight_version": version}
        flat = np.concatenate([np.ascontiguousarray(a).reshape(-1) for _, _, a in items])
        fut = self._pool.submit(self.client.call_all, "POST", "/update_weights_from_distributed", body,
                                timeout_s=self.timeout_s)
        try:
            self.peer.broadcast(dt, flat.size, flat)
        finally:
            fut.result(timeout=self.timeout_s)

    def close(self) -> None:
        """Leave the group on every server and stop the peer."""
        if self.peer is not None:
            try:
                self.client.call_all("POST", "/destroy_weights_update_group", {"group_name": self.group_name},
                                     timeout_s=60)
            finally:
                self.peer.close()
                self.peer = None
        self._pool.shutdown(wait=False)
