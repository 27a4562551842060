"""SGLang 0.5.23's HTTP JSON shapes, in one place: the request fields it defines, validation of
``/generate`` bodies (the JAX rollout server's side) and the encoding / decoding of rollout
requests and replies (the client's side).

``/generate`` body (one item, or a batch when ``input_ids`` is a list of lists)::

    {"input_ids": [int] | [[int]], "text": str | [str], "rid": str | [str],
     "sampling_params": {...} | [{...}], "return_logprob": bool | [bool],
     "logprob_start_len": int | [int], ...}

Reply item (a dict for one sample, a list for a batch or ``n > 1``, grouped per prompt)::

    {"text": str, "output_ids": [int],
     "meta_info": {"id": rid, "finish_reason": {"type": "stop", "matched": id} | {"type": "length",
                   "length": L} | {"type": "abort", "message": str},
                   "prompt_tokens": P, "completion_tokens": R, "cached_tokens": 0,
                   "weight_version": str, "e2e_latency": s,
                   "output_token_logprobs": [[logp, id, text|null], ...],  # return_logprob
                   "input_token_logprobs": [[logp | null, id, null], ...],  # logprob_start_len >= 0
                   "output_top_logprobs": [[[logp, id, null] x k] per token],  # top_logprobs_num k
                   "input_top_logprobs": [null | [[logp, id, null] x k] per position],
                   "routed_experts": base64 of int32 [P + R - 1, num_hidden_layers, top_k]}}

``stream: true`` answers Server-Sent Events instead: ``data: {item}`` lines (each item
cumulative: all tokens so far, ``finish_reason`` null until the last one; ``index`` = the
item's position in a batch / ``n`` group), closed by ``data: [DONE]`` (SGLang's default,
non-incremental streaming).

``input_token_logprobs`` covers prompt positions ``logprob_start_len .. P-1``; the entry of
position 0 has a null log-prob (nothing predicts the first token). Teacher-forced scoring sends
``prompt + response`` with ``max_new_tokens: 0`` and ``logprob_start_len: 0`` and reads the last
``len(response)`` entries.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .types import FINISH_REASONS, RolloutError, Sample, SamplingParams, sample_seed

#: ``/server_info`` ``backend`` of ``launch/serve.py`` (SGLang has no such field): a trainer that
#: sees it on every server may sync weights in the params layout (``weight_sync.DiskWeightSync``)
BACKEND = "cascade-jax"

__all__ = ["GENERATE_FIELDS", "SAMPLING_FIELDS", "BODY_FIELDS", "RequestError", "GenerateItem",
           "parse_generate", "check_body", "generate_item_reply", "encode_generate",
           "encode_score", "decode_sample", "decode_score", "derive_seed", "RoutedLayout",
           "encode_routed_experts", "decode_routed_experts", "sse"]

#: Top-level ``/generate`` fields of SGLang 0.5.23's ``GenerateReqInput`` (RL-relevant subset
#: plus the multimodal / session fields, which the JAX server refuses).
GENERATE_FIELDS = frozenset({
    "text", "input_ids", "input_embeds", "image_data", "video_data", "audio_data", "sampling_params",
    "rid", "return_logprob", "logprob_start_len", "top_logprobs_num", "token_ids_logprob",
    "return_text_in_logprobs", "stream", "log_metrics", "return_hidden_states", "modalities",
    "session_params", "lora_path", "lora_id", "custom_logit_processor", "bootstrap_host",
    "bootstrap_port", "bootstrap_room", "data_parallel_rank", "no_logs", "return_routed_experts",
    "return_entropy", "return_sampling_mask", "priority",
})

#: ``sampling_params`` keys of SGLang 0.5.23's ``SamplingParams``.
SAMPLING_FIELDS = frozenset({
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k",
    "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n",
    "json_schema", "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens",
    "spaces_between_special_tokens", "no_stop_trim", "custom_params", "stream_interval",
    "logit_bias", "sampling_seed",
})

#: Body fields of the other endpoints (SGLang 0.5.23 ``io_struct``).
BODY_FIELDS = {
    "/update_weights_from_disk": frozenset({
        "model_path", "load_format", "abort_all_requests", "weight_version", "is_async",
        "torch_empty_cache", "keep_pause", "recapture_cuda_graph", "token_step", "flush_cache",
        "manifest"}),
    "/init_weights_update_group": frozenset({
        "master_address", "master_port", "rank_offset", "world_size", "group_name", "backend"}),
    "/update_weights_from_distributed": frozenset({
        "names", "dtypes", "shapes", "group_name", "flush_cache", "abort_all_requests",
        "weight_version", "load_format", "selector", "torch_empty_cache"}),
    "/update_weights_from_tensor": frozenset({
        "serialized_named_tensors", "load_format", "flush_cache", "abort_all_requests",
        "weight_version", "selector", "torch_empty_cache"}),
    "/release_memory_occupation": frozenset({"tags"}),
    "/resume_memory_occupation": frozenset({"tags"}),
    "/destroy_weights_update_group": frozenset({"group_name"}),
    "/pause_generation": frozenset({"mode"}),
    "/continue_generation": frozenset({"torch_empty_cache"}),
    "/flush_cache": frozenset({"timeout_s"}),
    "/abort_request": frozenset({"rid", "abort_all"}),
}

# SGLang fields the JAX server accepts only at their default (they change nothing then).
_SAMPLING_DEFAULT_ONLY = {
    "min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
    "min_new_tokens": 0, "json_schema": None, "regex": None, "ebnf": None, "structural_tag": None,
    "stop_regex": None, "logit_bias": None,
}
_SAMPLING_BOOL = ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim")
_TOP_DEFAULT_ONLY = {
    "input_embeds": None, "token_ids_logprob": None,
    "return_hidden_states": False, "modalities": None, "lora_path": None,
    "lora_id": None, "custom_logit_processor": None, "bootstrap_host": None, "bootstrap_port": None,
    "bootstrap_room": None, "data_parallel_rank": None,
    "return_entropy": False, "return_sampling_mask": False,
}
_MULTIMODAL = ("image_data", "video_data", "audio_data")  # accepted when absent, null or empty
MAX_N = 1024  # samples per request the server accepts
MAX_TOP_LOGPROBS = 64  # top_logprobs_num the server accepts


class RequestError(ValueError):
    """A request body is invalid; ``field`` is the dotted name of the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


# --------------------------------------------------------------------------------------------
# Server side: validation


def _session(params: Any, batched: bool) -> Optional[str]:
    """``session_params`` (SGLang's ``SessionParams``: ``id``, ``rid``, ``offset``, ``replace``,
    ``drop_previous_output``) -> the session id, or None. The JAX server keeps a finished
    sample's cache under ``id`` and continues it when the next prompt of the session extends the
    kept row (prefilling only the new tokens; otherwise the prompt is prefilled whole): no
    ``/open_session`` is needed, and only ``id`` may be set (the others must be null / false)."""
    if params is None:
        return None
    if not isinstance(params, dict):
        raise RequestError("session_params", f"expected an object with an id, got {params!r}")
    for k, v in params.items():
        if k == "id":
            continue
        if k not in ("rid", "offset", "replace", "drop_previous_output"):
            raise RequestError(f"session_params.{k}", "unknown field; valid: id, rid, offset, replace, "
                                                      "drop_previous_output")
        if v not in (None, False):
            raise RequestError(f"session_params.{k}", "not supported by the JAX rollout server (a "
                                                      "session continues when the prompt extends its row)")
    sid = params.get("id")
    if not isinstance(sid, str) or not sid:
        raise RequestError("session_params.id", f"expected a non-empty string, got {sid!r}")
    if batched:
        raise RequestError("session_params", "a session continues one prompt: not in a batched body")
    return sid


@dataclasses.dataclass(frozen=True)
class GenerateItem:
    """One prompt of a ``/generate`` body, validated."""

    prompt_ids: tuple
    sampling: SamplingParams
    rid: str
    return_logprob: bool
    logprob_start_len: int  # -1 = no input log-probs
    return_routed_experts: bool = False
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    session: Optional[str] = None  # session_params.id: continue / keep this session's cache


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _num(x, field: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise RequestError(field, f"expected a finite number, got {x!r}")
    return float(x)


def _int(x, field: str) -> int:
    if not _is_int(x):
        raise RequestError(field, f"expected an integer, got {x!r}")
    return x


def _token_list(x, field: str, vocab_size: int) -> tuple:
    if not isinstance(x, list):
        raise RequestError(field, f"expected a list of token ids, got {type(x).__name__}")
    for i, t in enumerate(x):
        if not _is_int(t) or not 0 <= t < vocab_size:
            raise RequestError(f"{field}[{i}]", f"expected a token id in [0, {vocab_size}), got {t!r}")
    return tuple(x)


async def read_json(request) -> Any:
    """The JSON body of an HTTP request (anything with ``await request.body()``); None when
    empty; :class:`RequestError` on ``body`` when it is not JSON."""
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError("body", f"malformed JSON ({e})") from None


def check_body(body: Any, endpoint: str, required: Sequence[str] = ()) -> dict:
    """``body`` as a dict of the fields ``endpoint`` defines (None = ``{}``); unknown or missing
    fields raise :class:`RequestError`."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise RequestError("body", f"expected a JSON object, got {type(body).__name__}")
    known = BODY_FIELDS[endpoint]
    for k in body:
        if k not in known:
            raise RequestError(k, f"unknown field for {endpoint}; valid fields: {', '.join(sorted(known))}")
    for k in required:
        if body.get(k) is None:
            raise RequestError(k, "required")
    return body


def _sampling(sp: Any, field: str, *, vocab_size: int, max_new_limit: int) -> SamplingParams:
    if sp is None:
        sp = {}
    if not isinstance(sp, dict):
        raise RequestError(field, f"expected an object, got {type(sp).__name__}")
    for k, v in sp.items():
        f = f"{field}.{k}"
        if k not in SAMPLING_FIELDS:
            raise RequestError(f, f"unknown sampling parameter; valid: {', '.join(sorted(SAMPLING_FIELDS))}")
        if k in _SAMPLING_DEFAULT_ONLY and v is not None and v != _SAMPLING_DEFAULT_ONLY[k]:
            raise RequestError(f, f"not supported by the JAX rollout server (only "
                                  f"{_SAMPLING_DEFAULT_ONLY[k]!r})")
        if k in _SAMPLING_BOOL and v is not None and not isinstance(v, bool):
            raise RequestError(f, f"expected a bool, got {v!r}")
    kw: dict = {}
    if sp.get("max_new_tokens") is not None:
        m = _int(sp["max_new_tokens"], f"{field}.max_new_tokens")
        if not 0 <= m <= max_new_limit:
            raise RequestError(f"{field}.max_new_tokens", f"must be in [0, {max_new_limit}], got {m}")
        kw["max_new_tokens"] = m
    if sp.get("temperature") is not None:
        t = _num(sp["temperature"], f"{field}.temperature")
        if t < 0:
            raise RequestError(f"{field}.temperature", f"must be >= 0, got {t}")
        kw["temperature"] = t
    if sp.get("top_p") is not None:
        p = _num(sp["top_p"], f"{field}.top_p")
        if not 0.0 < p <= 1.0:
            raise RequestError(f"{field}.top_p", f"must be in (0, 1], got {p}")
        kw["top_p"] = p
    if sp.get("top_k") is not None:
        k = _int(sp["top_k"], f"{field}.top_k")
        if k == 0 or k < -1:
            raise RequestError(f"{field}.top_k", f"must be -1 (off) or >= 1, got {k}")
        kw["top_k"] = k
    if sp.get("n") is not None:
        n = _int(sp["n"], f"{field}.n")
        if not 1 <= n <= MAX_N:
            raise RequestError(f"{field}.n", f"must be in [1, {MAX_N}], got {n}")
        kw["n"] = n
    if sp.get("sampling_seed") is not None:
        s = _int(sp["sampling_seed"], f"{field}.sampling_seed")
        if not 0 <= s < 2**63:
            raise RequestError(f"{field}.sampling_seed", f"must be in [0, 2^63), got {s}")
        kw["seed"] = s
    if sp.get("stop_token_ids") is not None:
        kw["stop_token_ids"] = _token_list(sp["stop_token_ids"], f"{field}.stop_token_ids", vocab_size)
    stop = sp.get("stop")
    if stop not in (None, "", []):
        raise RequestError(f"{field}.stop", "stop strings are not supported by the JAX rollout server; "
                                            "use stop_token_ids")
    if sp.get("stream_interval") is not None:
        _int(sp["stream_interval"], f"{field}.stream_interval")
    if sp.get("custom_params") is not None and not isinstance(sp["custom_params"], dict):
        # SGLang hands custom_params to a custom logit processor; without one (the JAX server
        # runs none) they change nothing
        raise RequestError(f"{field}.custom_params", f"expected an object, got {sp['custom_params']!r}")
    return SamplingParams(**kw)


def _per_item(value, n: int, field: str) -> list:
    """A scalar broadcast to ``n`` items, or a list of exactly ``n``."""
    if isinstance(value, list):
        if len(value) != n:
            raise RequestError(field, f"has {len(value)} entries for a batch of {n}")
        return value
    return [value] * n


def parse_generate(body: Any, *, vocab_size: int, context_length: int,
                   tokenize: Optional[Callable[[str], list]] = None,
                   new_rid: Callable[[], str]) -> tuple[list, bool]:
    """Validate a ``/generate`` body. Returns ``(items, batched)``: one :class:`GenerateItem` per
    prompt and whether the body was a batch (the reply is then a list even for ``n = 1``).

    ``tokenize`` turns ``text`` into ids (None: the checkpoint has no tokenizer, ``text`` is
    refused). Prompt plus ``max_new_tokens`` must fit in ``context_length``.
    """
    if not isinstance(body, dict):
        raise RequestError("body", f"expected a JSON object, got {type(body).__name__}")
    for k, v in body.items():  # unknown top-level fields are ignored, as SGLang's dataclass does
        if k in _TOP_DEFAULT_ONLY and v is not None and v != _TOP_DEFAULT_ONLY[k]:
            raise RequestError(k, f"not supported by the JAX rollout server (only {_TOP_DEFAULT_ONLY[k]!r})")
        if k in _MULTIMODAL and v not in (None, [], "") and not (isinstance(v, list) and all(
                x in (None, []) for x in v)):
            raise RequestError(k, "the JAX rollout server serves a text-only model: only an empty "
                                  "list (or null) is accepted")
    for k in ("stream", "return_text_in_logprobs"):
        if body.get(k) is not None and not isinstance(body[k], bool):
            raise RequestError(k, f"expected a bool, got {body[k]!r}")
    has_ids, has_text = body.get("input_ids") is not None, body.get("text") is not None
    if has_ids == has_text:
        raise RequestError("input_ids", "exactly one of input_ids and text is required")
    if has_text:
        if tokenize is None:
            raise RequestError("text", "this checkpoint has no tokenizer; send input_ids")
        text = body["text"]
        batched = isinstance(text, list)
        texts = text if batched else [text]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise RequestError("text", "expected a string or a non-empty list of strings")
        prompts = [tuple(tokenize(t)) for t in texts]
        field = "text"
    else:
        ids = body["input_ids"]
        if not isinstance(ids, list):
            raise RequestError("input_ids", f"expected a list of token ids, got {type(ids).__name__}")
        batched = bool(ids) and isinstance(ids[0], list)
        raw = ids if batched else [ids]
        prompts = [_token_list(p, f"input_ids[{i}]" if batched else "input_ids", vocab_size)
                   for i, p in enumerate(raw)]
        field = "input_ids"
    if not prompts:
        raise RequestError(field, "empty batch")
    b = len(prompts)
    sps = _per_item(body.get("sampling_params"), b, "sampling_params")
    rids = body.get("rid")
    if rids is not None and not isinstance(rids, (str, list)):
        raise RequestError("rid", f"expected a string or a list of strings, got {rids!r}")
    rids = _per_item(rids, b, "rid") if isinstance(rids, list) or not batched else [
        f"{rids}-{i}" if rids is not None else None for i in range(b)]
    rets = _per_item(body.get("return_logprob", False), b, "return_logprob")
    starts = _per_item(body.get("logprob_start_len", -1), b, "logprob_start_len")
    tops = _per_item(body.get("top_logprobs_num", 0), b, "top_logprobs_num")
    routed = body.get("return_routed_experts", False)
    if routed is None:
        routed = False
    if not isinstance(routed, bool):
        raise RequestError("return_routed_experts", f"expected a bool, got {routed!r}")
    session = _session(body.get("session_params"), batched)
    items, ns = [], set()
    for i, (prompt, sp, rid, ret, start, top) in enumerate(zip(prompts, sps, rids, rets, starts, tops)):
        sfx = f"[{i}]" if batched else ""
        if not prompt:
            raise RequestError(f"{field}{sfx}", "empty prompt")
        if len(prompt) >= context_length:
            raise RequestError(f"{field}{sfx}", f"prompt of {len(prompt)} tokens does not fit the context "
                                                f"length {context_length}")
        sampling = _sampling(sp, f"sampling_params{sfx if isinstance(body.get('sampling_params'), list) else ''}",
                             vocab_size=vocab_size, max_new_limit=context_length - len(prompt))
        ns.add(sampling.n)
        if rid is not None and not isinstance(rid, str):
            raise RequestError(f"rid{sfx}", f"expected a string, got {rid!r}")
        if ret is None:
            ret = False
        if not isinstance(ret, bool):
            raise RequestError(f"return_logprob{sfx}", f"expected a bool, got {ret!r}")
        if start is None:
            start = -1
        start = _int(start, f"logprob_start_len{sfx}")
        if not -1 <= start < len(prompt):
            raise RequestError(f"logprob_start_len{sfx}", f"must be -1 or in [0, {len(prompt)}), got {start}")
        top = 0 if top is None else _int(top, f"top_logprobs_num{sfx}")
        if not 0 <= top <= min(MAX_TOP_LOGPROBS, vocab_size):
            raise RequestError(f"top_logprobs_num{sfx}", f"must be in [0, {min(MAX_TOP_LOGPROBS, vocab_size)}], "
                                                         f"got {top}")
        items.append(GenerateItem(prompt, sampling, rid or new_rid(), ret, start if ret else -1, routed,
                                  top if ret else 0, bool(body.get("return_text_in_logprobs")), session))
    if len(ns) > 1:
        raise RequestError("sampling_params.n", "all items of a batch must share the same n")
    if session is not None and items[0].sampling.n != 1:
        raise RequestError("session_params", "a session continues one sample: needs n = 1")
    return items, batched or items[0].sampling.n > 1


@dataclasses.dataclass(frozen=True)
class RoutedLayout:
    """Where SGLang 0.5.23 puts routed experts: its capturer holds int32
    ``[tokens, num_hidden_layers, top_k]``, zero-initialised, and each MoE layer writes the row
    of its own (global) decoder layer index; a request's ``meta_info.routed_experts`` is the
    base64 of the rows of its first ``seqlen - 1`` tokens (``seqlen = P + R``) in C order.
    ``moe_layers``: the global indices of the MoE layers (``'E'`` in the hybrid pattern)."""

    num_hidden_layers: int
    moe_layers: tuple
    top_k: int

    @classmethod
    def of(cls, model_cfg) -> "RoutedLayout":
        pattern = model_cfg.pattern
        return cls(len(pattern), tuple(i for i, c in enumerate(pattern) if c == "E"),
                   int(model_cfg.num_experts_per_tok))


def encode_routed_experts(rx: np.ndarray, layout: RoutedLayout) -> str:
    """``rx [T, L_moe, K]`` (the engine's MoE layers in order) -> base64 of int32
    ``[T, num_hidden_layers, K]``: MoE layer ``j`` at row ``layout.moe_layers[j]``, every other
    layer 0 (as SGLang's zero-initialised capture buffer)."""
    rx = np.asarray(rx)
    if rx.ndim != 3 or rx.shape[1:] != (len(layout.moe_layers), layout.top_k):
        raise ValueError(f"routed_experts: expected [T, {len(layout.moe_layers)}, {layout.top_k}], got {rx.shape}")
    full = np.zeros((rx.shape[0], layout.num_hidden_layers, layout.top_k), np.int32)
    full[:, list(layout.moe_layers)] = rx
    return base64.b64encode(full.tobytes()).decode("ascii")


def decode_routed_experts(data: str, seq_len: int, layout: RoutedLayout) -> np.ndarray:
    """``meta_info.routed_experts`` of a ``seq_len``-token sequence (prompt + response) ->
    ``[seq_len - 1, L_moe, K]`` int32 (the MoE layers' rows). Raises ``ValueError`` when the
    size does not match ``[seq_len - 1, num_hidden_layers, top_k]``."""
    flat = np.frombuffer(base64.b64decode(data.encode("ascii")), np.int32)
    want = (seq_len - 1) * layout.num_hidden_layers * layout.top_k
    if flat.size != want:
        raise ValueError(f"routed_experts: {flat.size} values, expected (seq_len - 1) * num_hidden_layers * top_k "
                         f"= {seq_len - 1} * {layout.num_hidden_layers} * {layout.top_k} = {want}")
    full = flat.reshape(seq_len - 1, layout.num_hidden_layers, layout.top_k)
    return np.ascontiguousarray(full[:, list(layout.moe_layers)])


def _triples(lps, ids, texts=None) -> list:
    return [[None if lp is None else float(lp), int(t), None if texts is None else texts[i]]
            for i, (lp, t) in enumerate(zip(lps, ids))]


def _top(entries, text_of=None) -> list:
    """``[[(logp, id), ...] | None per position]`` -> SGLang's ``[[[logp, id, text], ...] | None]``."""
    return [None if e is None else [[float(lp), int(t), None if text_of is None else text_of(int(t))]
                                    for lp, t in e] for e in entries]


def generate_item_reply(*, rid: str, prompt_ids: Sequence[int], output_ids: Sequence[int],
                        output_logprobs: Optional[Sequence[float]], finish_reason: Optional[str],
                        matched: Optional[int], max_new_tokens: int, weight_version: str,
                        input_logprobs: Optional[Sequence[Optional[float]]], logprob_start_len: int,
                        e2e_latency: float, text: str = "", abort_message: str = "",
                        routed_experts: Optional[np.ndarray] = None,
                        routed_layout: Optional[RoutedLayout] = None,
                        output_top: Optional[list] = None, input_top: Optional[list] = None,
                        text_of: Optional[Callable[[int], str]] = None) -> dict:
    """One reply item in SGLang's layout (see module doc). ``input_logprobs`` are the log-probs
    of prompt positions ``logprob_start_len .. P-1`` (None at position 0); ``output_top`` /
    ``input_top`` the top-k ``(logp, id)`` pairs per output token / per those prompt positions
    (None at position 0). ``routed_experts [P + R - 1, L_moe, K]`` becomes
    ``meta_info.routed_experts`` (:func:`encode_routed_experts` with ``routed_layout``).
    ``finish_reason`` None: a streaming chunk of an unfinished item. ``text_of``: token text for
    ``return_text_in_logprobs`` (None: the text slot is null)."""
    if finish_reason is None:
        fr = None
    elif finish_reason == "stop":
        fr = {"type": "stop", "matched": matched}
    elif finish_reason == "length":
        fr = {"type": "length", "length": max_new_tokens}
    else:
        fr = {"type": "abort", "message": abort_message or "aborted"}
    meta = {"id": rid, "finish_reason": fr, "prompt_tokens": len(prompt_ids),
            "completion_tokens": len(output_ids), "cached_tokens": 0,
            "weight_version": weight_version, "e2e_latency": e2e_latency}
    if output_logprobs is not None:
        out_texts = None if text_of is None else [text_of(int(t)) for t in output_ids]
        meta["output_token_logprobs"] = _triples(output_logprobs, output_ids, out_texts)
        if logprob_start_len >= 0:
            toks = list(prompt_ids)[logprob_start_len:]
            in_texts = None if text_of is None else [text_of(int(t)) for t in toks]
            meta["input_token_logprobs"] = _triples(input_logprobs, toks, in_texts)
        if output_top is not None:
            meta["output_top_logprobs"] = _top(output_top, text_of)
            if logprob_start_len >= 0:
                meta["input_top_logprobs"] = _top(input_top, text_of)
    if routed_experts is not None:
        meta["routed_experts"] = encode_routed_experts(routed_experts, routed_layout)
    return {"text": text, "output_ids": [int(t) for t in output_ids], "meta_info": meta}


def sse(obj) -> bytes:
    """One Server-Sent Events line as SGLang streams ``/generate``: ``data: <json>`` + blank line
    (``obj`` = ``"[DONE]"`` closes the stream)."""
    import json
    return b"data: " + (obj.encode() if isinstance(obj, str) else json.dumps(obj).encode()) + b"\n\n"


# --------------------------------------------------------------------------------------------
# Client side: bodies and replies


def derive_seed(seed: Optional[int], k: int) -> Optional[int]:
    """``sampling_seed`` of sample ``k`` of a request with ``seed`` (one body per sample: SGLang
    would give every copy of an ``n > 1`` body the same seed): :func:`types.sample_seed`, the
    seed the engines give sample ``k`` themselves, so the bodies' samples equal the request's
    (``seed`` for ``k = 0``). Stable across runs."""
    if seed is None:
        return None
    return sample_seed(seed, k)


def encode_generate(prompt_ids: Sequence[int], sp: SamplingParams, *, rid: str, k: int = 0,
                    return_routed_experts: bool = False, session: Optional[str] = None) -> dict:
    """The ``/generate`` body of sample ``k`` of a request (``n = 1``; only 0.5.23 fields);
    ``return_routed_experts`` asks for the experts of every token (routing replay);
    ``session`` sends ``session_params: {"id": session}`` (a JAX server with
    ``--keep-sessions`` then prefills only the tokens after the session's kept row)."""
    params = {"max_new_tokens": int(sp.max_new_tokens), "temperature": float(sp.temperature),
              "top_p": float(sp.top_p), "top_k": int(sp.top_k), "n": 1,
              "stop_token_ids": [int(t) for t in sp.stop_token_ids],
              "skip_special_tokens": False, "spaces_between_special_tokens": False,
              "no_stop_trim": True}
    seed = derive_seed(sp.seed, k)
    if seed is not None:
        params["sampling_seed"] = seed
    body = {"input_ids": [int(t) for t in prompt_ids], "rid": rid, "return_logprob": True,
            "sampling_params": params}
    if return_routed_experts:
        body["return_routed_experts"] = True
    if session is not None:
        body["session_params"] = {"id": str(session)}
    return body


def encode_score(prompt_ids: Sequence[int], response_ids: Sequence[int], *, rid: str,
                 top_logprobs_num: int = 0) -> dict:
    """Teacher-forced scoring body: ``prompt + response``, no new tokens, input log-probs from 0
    (with ``top_logprobs_num > 0`` also each position's top ``top_logprobs_num``,
    ``input_top_logprobs``)."""
    body = {"input_ids": [int(t) for t in prompt_ids] + [int(t) for t in response_ids], "rid": rid,
            "return_logprob": True, "logprob_start_len": 0,
            "sampling_params": {"max_new_tokens": 0, "temperature": 1.0}}
    if top_logprobs_num:
        body["top_logprobs_num"] = int(top_logprobs_num)
    return body


def _bad(field: str, msg: str):
    return RolloutError(f"bad server reply: {field}: {msg}")


def _meta(item: Any) -> dict:
    if isinstance(item, list) and len(item) == 1:
        item = item[0]
    if not isinstance(item, dict) or not isinstance(item.get("meta_info"), dict):
        raise _bad("meta_info", f"expected an object with meta_info, got {str(item)[:200]}")
    return item["meta_info"]


def decode_sample(item: Any, prompt_ids: Sequence[int], routed_layout: Optional[RoutedLayout] = None) -> Sample:
    """A reply item (n = 1, ``return_logprob``) as a :class:`Sample`; tokens and log-probs are
    both read from ``output_token_logprobs`` so they align. With ``routed_layout`` the item must
    carry ``meta_info.routed_experts`` (SGLang's layout), decoded into ``Sample.routed_experts
    [P + R - 1, L_moe, K]``. Malformed replies raise :class:`RolloutError` naming the field."""
    meta = _meta(item)
    fr = meta.get("finish_reason")
    if not isinstance(fr, dict) or fr.get("type") not in FINISH_REASONS:
        raise _bad("meta_info.finish_reason", f"expected {{'type': one of {FINISH_REASONS}}}, got {fr!r}")
    triples = meta.get("output_token_logprobs")
    if not isinstance(triples, list):
        raise _bad("meta_info.output_token_logprobs", f"expected a list, got {type(triples).__name__}")
    toks, lps = [], []
    for i, tr in enumerate(triples):
        if (not isinstance(tr, list) or len(tr) < 2 or not _is_int(tr[1])
                or isinstance(tr[0], bool) or not isinstance(tr[0], (int, float))):
            raise _bad(f"meta_info.output_token_logprobs[{i}]", f"expected [logprob, token_id, ...], got {tr!r}")
        lps.append(float(tr[0]))
        toks.append(tr[1])
    version = meta.get("weight_version")
    if not isinstance(version, str):
        raise _bad("meta_info.weight_version", f"expected a string, got {version!r}")
    rx = None
    if routed_layout is not None:
        data = meta.get("routed_experts")
        if not isinstance(data, str):
            raise _bad("meta_info.routed_experts", f"expected a base64 string, got {str(data)[:80]!r}")
        try:
            rx = decode_routed_experts(data, len(prompt_ids) + len(toks), routed_layout)
        except (ValueError, TypeError) as e:
            raise _bad("meta_info.routed_experts", str(e)) from None
    return Sample(prompt_ids=np.asarray(prompt_ids, np.int32), response_ids=np.asarray(toks, np.int32),
                  logprobs=np.asarray(lps, np.float32), finish_reason=fr["type"], weight_version=version,
                  routed_experts=rx)


def decode_score(item: Any, n_prompt: int, n_response: int, *, topk: int = 0) -> tuple:
    """``([n_response] float32 log-probs of the response, weight_version)`` from a scoring reply;
    with ``topk > 0`` ``(logp, topk_ids [n_response, topk] int32, topk_logp [n_response, topk]
    float32, weight_version)`` from ``input_top_logprobs`` at the response positions (entry
    ``i`` is the distribution that predicts input token ``i``), in the reply's order."""
    meta = _meta(item)
    triples = meta.get("input_token_logprobs")
    total = n_prompt + n_response
    if not isinstance(triples, list) or len(triples) != total:
        raise _bad("meta_info.input_token_logprobs",
                   f"expected {total} entries, got {len(triples) if isinstance(triples, list) else triples!r}")
    out = []
    for i, tr in enumerate(triples[n_prompt:], start=n_prompt):
        if not isinstance(tr, list) or not tr or isinstance(tr[0], bool) or not isinstance(tr[0], (int, float)):
            raise _bad(f"meta_info.input_token_logprobs[{i}]", f"expected [logprob, token_id, ...], got {tr!r}")
        out.append(float(tr[0]))
    logp, version = np.asarray(out, np.float32), str(meta.get("weight_version"))
    if not topk:
        return logp, version
    tops = meta.get("input_top_logprobs")
    if not isinstance(tops, list) or len(tops) != total:
        raise _bad("meta_info.input_top_logprobs",
                   f"expected {total} entries, got {len(tops) if isinstance(tops, list) else tops!r}")
    ids = np.zeros((n_response, topk), np.int32)
    lps = np.zeros((n_response, topk), np.float32)
    for r, i in enumerate(range(n_prompt, total)):
        entry = tops[i]
        if not isinstance(entry, list) or len(entry) != topk:
            raise _bad(f"meta_info.input_top_logprobs[{i}]",
                       f"expected {topk} [logprob, token_id, ...] entries, got {str(entry)[:200]}")
        for k, tr in enumerate(entry):
            if (not isinstance(tr, list) or len(tr) < 2 or isinstance(tr[0], bool)
                    or not isinstance(tr[0], (int, float)) or isinstance(tr[1], bool)
                    or not isinstance(tr[1], int)):
                raise _bad(f"meta_info.input_top_logprobs[{i}][{k}]",
                           f"expected [logprob, token_id, ...], got {tr!r}")
            lps[r, k], ids[r, k] = float(tr[0]), int(tr[1])
    return logp, ids, lps, version
