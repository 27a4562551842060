"""Evaluation: avg@k and pass@k per domain (``launch/eval.py`` and the runner's periodic eval),
and the held-out loss of SFT stages.

For each domain, ``eval.prompts`` held-out prompts, ``eval.k`` samples each with the eval
sampling settings, scored by the domain's scorer (values in [0, 1]):

* ``avg@k``  = mean over prompts and samples of the score;
* ``pass@k`` = fraction of prompts with at least one fully correct sample (score = 1); with
  ``n = k`` samples this is the unbiased estimator ``1 − C(n − c, k) / C(n, k)`` of pass@k.

A group-relative scorer (the ``rlhf`` GenRM: each sample's mean pairwise win rate within its
group) averages 0.5 over any group, so it cannot measure progress; a prompt whose metadata holds
``baseline`` (a fixed answer) is instead scored ArenaHard-style: each sample is judged in a group
of two against the baseline, and its score is its win rate there (1 win, 0.5 tie, 0 loss).

Eval prompts come from the data pipeline (``cascade_jax.data.prompt_batches``) with
``data.shuffle_seed = eval.seed``: for the tiny domains that seed generates a different, fixed
example set (held out from the training stream, which uses ``data.shuffle_seed``); for file
sources it is a fixed reshuffle of the same rows (point ``data.sources`` at an eval split).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cascade_jax import config as C
from cascade_jax import data
from cascade_jax import rl
from cascade_jax.rollout import JaxEngine, Request, Rollouts, SamplingParams
from cascade_jax.runner import build as B
from cascade_jax.runner.errors import ConfigError

__all__ = ["EvalPrompt", "prompts_of", "heldout_prompts", "evaluate_rollouts", "evaluate", "pass_at_k",
           "sft_loss_fn", "format_table", "evaluate_checkpoint", "check_lengths"]

CORRECT = 1.0 - 1e-6


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
    domain: str
    text: str  # the user turn
    ids: tuple  # rendered prompt token ids (generation prompt appended)
    metadata: Mapping


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` correct: ``1 − C(n−c, k) / C(n, k)``."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def prompts_of(pb) -> list[EvalPrompt]:
    """The prompts of a ``cascade_jax.data.PromptBatch`` as :class:`EvalPrompt` records."""
    return [EvalPrompt(pb.domains[i], pb.prompts[i],
                       tuple(int(t) for t in pb.tokens[i, :pb.lengths[i]]), pb.metadata[i])
            for i in range(len(pb))]


def heldout_prompts(config, tokenizer, domains: Sequence[str]) -> list[EvalPrompt]:
    """``eval.prompts`` prompts per domain from the data pipeline with ``data.shuffle_seed =
    eval.seed`` (for the tiny domains that seed draws a different, fixed example set). The
    prompts and their order do not depend on the training stream's ``data.domain_draw``."""
    out = []
    for dom in domains:
        c = config
        for k, v in (("data.domains", [dom]), ("data.domain_weights", {}),
                     ("data.domain_draw", "multinomial"),
                     ("data.batch_prompts", config.eval.prompts), ("data.oversample", 1.0),
                     ("data.shuffle_seed", config.eval.seed)):
            c = C.replace_path(c, k, v)
        out += prompts_of(next(data.prompt_batches(c, tokenizer)))
    return out


def evaluate_rollouts(prompts: Sequence[EvalPrompt], responses: Sequence[Sequence[str]],
                      scorers: Mapping, k: int) -> dict:
    """Score ``responses[i]`` (``k`` texts for prompt ``i``) → ``{domain: {"avg@k", "pass@k",
    "n_prompts"}}``."""
    by_dom: dict = {}
    for p, rs in zip(prompts, responses):
        by_dom.setdefault(p.domain, []).append((p, rs))
    out = {}
    for dom, items in by_dom.items():
        ps = [p.text for p, rs in items for _ in rs]
        rs = [r for _, rr in items for r in rr]
        ms = [p.metadata for p, rr in items for _ in rr]
        if all("baseline" in m for m in ms):  # pairwise judges: win rate vs a fixed answer
            ms = [{**m, "group": f"eval-{j}"} for j, m in enumerate(ms) for _ in range(2)]
            rs = [x for r, m in zip(rs, ms[::2]) for x in (r, str(m["baseline"]))]
            ps = [x for x in ps for _ in range(2)]
            scores = np.asarray([s.value for s in scorers[dom](ps, rs, ms)][::2], np.float64)
        else:
            scores = np.asarray([s.value for s in scorers[dom](ps, rs, ms)], np.float64)
        scores = scores.reshape(len(items), k)
        correct = (scores >= CORRECT).sum(1)
        out[dom] = {f"avg@{k}": float(scores.mean()),
                    f"pass@{k}": float(np.mean([pass_at_k(k, int(c), k) for c in correct])),
                    "n_prompts": len(items)}
    return out


def _generate_counting(engine, reqs, progress) -> Rollouts:
    """``engine.generate(reqs)`` for an engine this thread drives (a ``JaxEngine`` not
    ``start()``-ed), calling ``progress(done, total)`` in samples whenever samples finish."""
    handles = [engine.submit(r) for r in reqs]
    total = sum(r.sampling.n for r in reqs)
    done = -1
    while True:
        now = sum(s is not None for h in handles for s in h.samples)
        if now != done:
            done = now
            progress(done, total)
        if all(h.done() for h in handles):
            break
        engine.step()
    return Rollouts(requests=tuple(reqs), groups=tuple(h.result() for h in handles))


def evaluate(engine, tokenizer, prompts: Sequence[EvalPrompt], scorers: Mapping, *, k: int,
             max_new_tokens: int, temperature: float, top_p: float = 1.0, top_k: int = -1,
             seed: int = 0, progress=None) -> dict:
    """Generate ``k`` samples per prompt with ``engine`` and score them (see module doc).
    Returns ``{"domains": {domain: {...}}, "score": mean avg@k over domains, "flat": {...}}``.
    ``progress(done, total)`` (samples) hears every finished sample; it needs an engine the
    caller's thread drives (``submit`` / ``step``, not ``start()``-ed) and the same results."""
    reqs = [Request(prompt_ids=p.ids, domain=p.domain, rid=f"eval-{i}",
                    sampling=SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                            top_p=top_p, top_k=top_k, n=k, seed=seed + i,
                                            stop_token_ids=(tokenizer.eos_id,)))
            for i, p in enumerate(prompts)]
    ro = (_generate_counting(engine, reqs, progress) if progress is not None
          else engine.generate(reqs))
    texts = [[tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in g]
             for g in ro.groups]
    doms = evaluate_rollouts(prompts, texts, scorers, k)
    score = float(np.mean([v[f"avg@{k}"] for v in doms.values()])) if doms else float("nan")
    flat = {f"{d}/{m}": v for d, ms in doms.items() for m, v in ms.items() if m != "n_prompts"}
    flat["score"] = score
    return {"domains": doms, "score": score, "flat": flat}


def sft_loss_fn(model_cfg, specs, compute_dtype):
    """Jitted ``(params, batch: SFTBatch) -> (sum of token NLL, token count)`` over the
    ``loss_mask`` tokens that have a prefix in their segment (the SFT objective, no update)."""
    @jax.jit
    def fn(params, batch):
        p = rl.compute_params(params, specs, compute_dtype)
        lp, _ = rl.token_logprobs(p, batch, model_cfg)
        mask = batch.loss_mask.astype(jnp.float32) * rl.segment_start_mask(batch.segment_ids)
        return -(lp * mask).sum(), mask.sum()

    return fn


def format_table(domains: Mapping[str, Mapping[str, float]]) -> str:
    """A plain-text table: one row per domain, one column per metric."""
    if not domains:
        return "(no domains)"
    cols = [c for c in next(iter(domains.values()))]
    w = max(len(d) for d in domains) + 2
    lines = ["domain".ljust(w) + "".join(c.rjust(12) for c in cols)]
    for d, ms in domains.items():
        lines.append(d.ljust(w) + "".join(
            (f"{ms[c]:12.4f}" if isinstance(ms[c], float) else f"{ms[c]:12d}") for c in cols))
    return "\n".join(lines)


def check_lengths(config, model_cfg, flag: str = "eval.max_response_len") -> None:
    """Prompt + response tokens of the evaluation fit the model's context
    (``max_position_embeddings``); else a ``ConfigError`` naming ``flag`` -- before any
    memory is sized by them."""
    e = config.eval
    max_new = e.max_response_len or config.rollout.sampling.max_response_len
    total = config.rollout.sampling.max_prompt_len + max_new
    if total > model_cfg.max_position_embeddings:
        room = model_cfg.max_position_embeddings - config.rollout.sampling.max_prompt_len
        raise ConfigError(f"{flag} {max_new}: prompts of up to {config.rollout.sampling.max_prompt_len} tokens "
                          f"plus {max_new} new tokens exceed the model's context of "
                          f"{model_cfg.max_position_embeddings} tokens; at most {max(room, 0)}")


def evaluate_checkpoint(config, phase=None, *, checkpoint=..., domains=None, progress=None) -> dict:
    """Evaluate the Hub checkpoint ``config.model.checkpoint`` on ``config.data.domains`` with
    the ``config.eval`` settings (engine: the embedded JAX engine). Returns :func:`evaluate`'s
    result (``{"domains": {d: {"avg@k", "pass@k", "n_prompts"}}, "score", "flat", ...}``) plus
    ``checkpoint`` and ``settings``. ``phase(text)`` hears what it is doing and
    ``progress(done, total)`` how many samples are generated (for progress lines).
    ``checkpoint`` (a Hub dir; ``None``: the preset with its seeded init) and ``domains``
    evaluate another model / other domains with the same settings (the cascade's registry and
    the studies score every checkpoint this way)."""
    phase = phase or (lambda _: None)
    if checkpoint is not ...:
        config = C.replace_path(config, "model.checkpoint", checkpoint)
    if domains is not None:
        config = C.replace_path(config, "data.domains", list(domains))
        config = C.replace_path(config, "data.domain_weights", {})
    check_lengths(config, B.model_config(config))
    phase("loading the checkpoint")
    model_cfg, params = B.build_model(config)
    tok = B.build_tokenizer(config)
    domains = B.stage_domains(config)
    e = config.eval
    max_new = e.max_response_len or config.rollout.sampling.max_response_len
    prompts = heldout_prompts(config, tok, domains)
    phase(f"generating {len(prompts)} prompts x {e.k} samples of up to {max_new} tokens "
          f"({', '.join(domains)}), then scoring")
    engine = JaxEngine(model_cfg, params, num_slots=min(len(prompts) * e.k, 256),
                       max_len=config.rollout.sampling.max_prompt_len + max_new)
    res = evaluate(engine, tok, prompts, B.build_scorers(config), k=e.k, max_new_tokens=max_new,
                   temperature=e.temperature, top_p=e.top_p, top_k=e.top_k,
                   seed=e.seed, progress=progress)
    settings = {"k": e.k, "prompts": e.prompts, "temperature": e.temperature,
                "top_p": e.top_p, "top_k": e.top_k, "max_new_tokens": max_new, "seed": e.seed,
                "thinking": config.rollout.sampling.thinking}
    return {"checkpoint": config.model.checkpoint, "settings": settings, **res}
