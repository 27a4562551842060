"""One stage's state and step: the train state, the RNG, the data iterator, the engine and
(for RL) the prompt → rollout → reward → batch path. :func:`cascade_jax.runner.loop.run_stage`
drives it; everything here is per step and holds no file I/O except :meth:`Stage.export`.
"""

from __future__ import annotations

import math
import pathlib
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cascade_jax import config as C
from cascade_jax import domains as D
from cascade_jax import rl
from cascade_jax.runner import build as B
from cascade_jax.runner import evaluate as E
from cascade_jax.runner.checkpoint import export_hub
from cascade_jax.runner.metrics import scalars

__all__ = ["Stage", "pack_rollouts", "MAX_DRAWS"]

#: prompt batches drawn per step at most when dynamic filtering needs more groups
MAX_DRAWS = 4


def pack_rollouts(rollouts, rewards: np.ndarray, *, prompt_len: int, response_len: int,
                  pad_id: int, domain_ids: np.ndarray, policy_version: int,
                  teacher_logp=None) -> rl.RLBatch:
    """Padded-layout ``RLBatch`` ``[N, prompt_len + response_len]`` of ``rollouts.samples()``
    (group ``i`` = request ``i``): prompt, response, padding; ``loss_mask`` and
    ``rollout_logp`` on response tokens; ``rewards [N]``; ``group_ids`` the request index;
    ``finish_reason`` codes; ``domain_ids [N]``; ``policy_version`` for every row."""
    from cascade_jax.rollout import FINISH_REASONS

    samples = rollouts.samples()
    N, T = len(samples), prompt_len + response_len
    tok = np.full((N, T), pad_id, np.int32)
    seg = np.zeros((N, T), np.int32)
    mask = np.zeros((N, T), np.float32)
    lp = np.zeros((N, T), np.float32)
    fin = np.zeros((N,), np.int32)
    gid = np.zeros((N,), np.int32)
    row = 0
    for g, group in enumerate(rollouts.groups):
        for s in group:
            p, r = len(s.prompt_ids), len(s.response_ids)
            tok[row, :p] = s.prompt_ids
            tok[row, p:p + r] = s.response_ids
            seg[row, :p + r] = 1
            mask[row, p:p + r] = 1.0
            lp[row, p:p + r] = s.logprobs
            fin[row] = FINISH_REASONS.index(s.finish_reason)
            gid[row] = g
            row += 1
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (N, T))
    return rl.RLBatch(tokens=jnp.asarray(tok), positions=jnp.asarray(pos),
                      segment_ids=jnp.asarray(seg), loss_mask=jnp.asarray(mask),
                      rollout_logp=jnp.asarray(lp), rewards=jnp.asarray(rewards, jnp.float32),
                      group_ids=jnp.asarray(gid), finish_reason=jnp.asarray(fin),
                      domain_ids=jnp.asarray(domain_ids, jnp.int32),
                      teacher_logp=teacher_logp,
                      policy_version=jnp.full((N,), policy_version, jnp.int32))


class Stage:
    """Per-stage state and step for ``sft``, ``grpo`` and ``mopd`` (see the loop module)."""

    def __init__(self, config: C.Config, run_dir: pathlib.Path, parts: B.Parts,
                 log: Callable[[str], None] = print):
        from models import nemotron_h as nh

        self.config, self.run_dir, self.parts, self.log = config, pathlib.Path(run_dir), parts, log
        self.obj = config.stage.objective
        self.dtype = B.compute_dtype(config)
        self.specs = nh.param_specs(parts.model_cfg)  # parameter roles (trainable, fp32, ...)
        self.state = rl.TrainState.from_config(parts.params, config.optimizer, self.specs)
        parts.params = None  # the master copy in ``state`` is the one copy we keep
        self.rng = jax.random.key(config.run.seed)
        self.active_params = nh.param_counts(parts.model_cfg)[1]
        self.tok = parts.tokenizer
        self._eval_prompts = None
        self._heldout = None
        self._sft_loss = None
        self._teacher_fns = {}
        # the engine starts with the initial weights, version "0" (= step 0)

    # ---- checkpoint state ------------------------------------------------------------------

    def checkpoint_state(self) -> dict:
        s = {"params": self.state.params, "opt_state": self.state.opt_state,
             "step": self.state.step, "rng": jax.random.key_data(self.rng)}
        if jax.default_backend() == "cpu":
            # CPU arrays can alias host memory; the next step donates them while orbax may
            # still be writing: give the checkpoint its own copy.
            s = jax.tree.map(lambda x: jnp.array(x, copy=True), s)
        return s

    def load_checkpoint_state(self, s: dict, data_state) -> None:
        import dataclasses

        self.state = dataclasses.replace(self.state, params=s["params"], opt_state=s["opt_state"],
                                         step=jnp.asarray(s["step"], jnp.int32))
        self.rng = jax.random.wrap_key_data(jnp.asarray(s["rng"]))
        if data_state is not None:
            self.parts.data.set_state(data_state)
        if self.parts.engine is not None and int(self.state.step) > 0:
            self.sync_weights()

    def data_state(self):
        return self.parts.data.get_state()

    # ---- weights ------------------------------------------------------------------------------

    def compute_params(self):
        return rl.compute_params(self.state.params, self.specs, self.dtype)

    def sync_weights(self) -> None:
        from cascade_jax.runner.loop import fault_point

        step = int(self.state.step)
        fault_point("sync", step)
        self.parts.engine.update_weights(self.compute_params(), str(step))

    def export(self, path: pathlib.Path) -> pathlib.Path:
        from cascade_jax.data import save_tokenizer

        out = export_hub(self.compute_params(), self.parts.model_cfg, path)
        save_tokenizer(self.tok, out)
        return out

    # ---- steps --------------------------------------------------------------------------------

    def step(self, step: int, timer) -> dict:
        self.rng, key = jax.random.split(self.rng)
        if self.obj == "sft":
            with timer("data"):
                batch = jax.tree.map(jnp.asarray, next(self.parts.data))
            with timer("train"):
                self.state, m = self.parts.train_step(self.state, batch)
                m = scalars(jax.block_until_ready(m))
            return m
        with timer("rollout_reward"):
            batch, info = self._rollout_batch(step, key, timer)
        if self.obj == "mopd":
            with timer("teacher"):
                batch, kl = self._teacher_logp(batch)
            info.update(kl)
        with timer("train"):
            self.state, m = self.parts.train_step(self.state, batch)
            m = scalars(jax.block_until_ready(m))
        with timer("sync"):
            self.sync_weights()
        return {**m, **info}

    def _requests(self, prompts, seeds, max_new_tokens=None):
        from cascade_jax.rollout import Request, SamplingParams

        r = self.config.rollout
        return [Request(prompt_ids=tuple(p.ids), domain=p.domain, metadata=p.metadata,
                        sampling=SamplingParams(
                            max_new_tokens=max_new_tokens or r.max_response_len,
                            temperature=0.0 if r.greedy else r.temperature, top_p=r.top_p,
                            top_k=r.top_k, n=r.n_samples, seed=int(sd),
                            stop_token_ids=(self.tok.eos_id,)))
                for p, sd in zip(prompts, seeds)]

    def _score(self, prompts, rollouts) -> np.ndarray:
        """``[n_prompts, n]`` rewards; each domain's prompts go to its scorer in one call."""
        n = self.config.rollout.n_samples
        texts = [[self.tok.decode(s.response_ids, skip_special_tokens=True) for s in g]
                 for g in rollouts.groups]
        out = np.zeros((len(prompts), n), np.float32)
        for dom in {p.domain for p in prompts}:
            idx = [i for i, p in enumerate(prompts) if p.domain == dom]
            scores = self.parts.scorers[dom]([prompts[i].text for i in idx for _ in range(n)],
                                             [t for i in idx for t in texts[i]],
                                             [prompts[i].metadata for i in idx for _ in range(n)])
            out[idx] = np.asarray([s.value for s in scores], np.float32).reshape(len(idx), n)
        return out

    def _rollout_batch(self, step: int, key, timer):
        """Rollouts for ``data.batch_prompts`` groups. Each draw is one ``PromptBatch`` of
        ``ceil(batch_prompts × oversample)`` prompts; with dynamic filtering only groups with
        reward variance are kept and further batches are drawn (at most ``MAX_DRAWS`` per step)
        until the batch is full; filtered groups fill any remainder (zero advantage, so they
        add no gradient). Without it the first ``batch_prompts`` groups are used."""
        from cascade_jax.rollout import Rollouts

        cfg = self.config
        want = cfg.data.batch_prompts
        kept, spare, drawn, draws, n_var = [], [], 0, 0, 0
        while len(kept) < want and draws < (MAX_DRAWS if cfg.stage.dynamic_filtering else 1):
            prompts = E.prompts_of(next(self.parts.data))
            drawn += len(prompts)
            seeds = np.asarray(jax.random.randint(jax.random.fold_in(key, draws),
                                                  (len(prompts),), 0, 2 ** 31 - 1))
            draws += 1
            with timer("rollout"):
                ro = self.parts.engine.generate(self._requests(prompts, seeds))
            with timer("reward"):
                rewards = self._score(prompts, ro)
            for p, g, r in zip(prompts, ro.groups, rewards):
                flat = bool(np.all(r == r[0]))
                n_var += not flat
                (spare if flat and cfg.stage.dynamic_filtering else kept).append((p, g, r))
        groups = (kept + spare)[:want]
        if len(groups) < want:
            raise RuntimeError(f"step {step}: {len(groups)} prompt groups < data.batch_prompts "
                               f"{want}")
        prompts = [p for p, _, _ in groups]
        ro = Rollouts(requests=tuple(self._requests(prompts, [0] * len(prompts))),
                      groups=tuple(g for _, g, _ in groups))
        rewards = np.concatenate([r for _, _, r in groups])
        dom_ids = np.repeat([D.domain_id(p.domain) for p in prompts], cfg.rollout.n_samples)
        batch = pack_rollouts(ro, rewards, prompt_len=cfg.rollout.max_prompt_len,
                              response_len=cfg.rollout.max_response_len, pad_id=self.tok.pad_id,
                              domain_ids=dom_ids, policy_version=int(self.state.step))
        lens = np.asarray([len(s.response_ids) for g in ro.groups for s in g], np.float64)
        info = {"prompts_drawn": float(drawn), "groups_with_variance": float(n_var),
                "response_len_p50": float(np.median(lens)),
                "truncated_frac": float(np.mean([s.finish_reason == "length"
                                                 for g in ro.groups for s in g]))}
        per = rewards.reshape(len(prompts), -1)
        for dom in sorted({p.domain for p in prompts}):
            sel = [i for i, p in enumerate(prompts) if p.domain == dom]
            info[f"reward/{dom}"] = float(per[sel].mean())
        return batch, info

    def _teacher_logp(self, batch: rl.RLBatch):
        """``teacher_logp [B, T]``: each row scored by its domain's teacher (in process), and
        the per-domain sampled reverse-KL estimate ``mean_t(log π_student − log π_teacher)``
        over response tokens (student = the rollout log-probs, on-policy)."""
        dom = np.asarray(batch.domain_ids)
        mask = np.asarray(batch.loss_mask)
        out = np.zeros(batch.tokens.shape, np.float32)
        info = {}
        by_teacher = {}
        for name, (tcfg, tparams) in self.parts.teachers.items():
            by_teacher.setdefault(id(tparams), (tcfg, tparams, []))[2].append(name)
        view = rl.SFTBatch(tokens=batch.tokens, positions=batch.positions,
                           segment_ids=batch.segment_ids, loss_mask=batch.loss_mask)
        for tid, (tcfg, tparams, names) in by_teacher.items():
            rows = np.isin(dom, [D.domain_id(n) for n in names])
            if not rows.any():
                continue
            fn = self._teacher_fns.get(tid)
            if fn is None:
                fn = self._teacher_fns[tid] = jax.jit(
                    lambda p, b, c=tcfg: rl.token_logprobs(p, b, c)[0])
            lp = np.asarray(fn(tparams, view))
            out[rows] = lp[rows] * mask[rows]
        student = np.asarray(batch.rollout_logp)
        for name in self.parts.teachers:
            rows = dom == D.domain_id(name)
            if rows.any():
                m = mask[rows]
                info[f"mopd/reverse_kl/{name}"] = float(((student[rows] - out[rows]) * m).sum()
                                                        / max(m.sum(), 1.0))
        return batch.replace(teacher_logp=jnp.asarray(out)), info

    # ---- evaluation ---------------------------------------------------------------------------

    def evaluate(self, step: int) -> dict:
        """SFT: held-out loss (score = −loss). RL: avg@k / pass@k per domain (score = mean
        avg@k)."""
        cfg = self.config
        if self.obj == "sft":
            if self._heldout is None:
                self._heldout = self._heldout_sft()
                self._sft_loss = E.sft_loss_fn(self.parts.model_cfg, self.specs, self.dtype)
            if not self._heldout:
                return None
            tot = cnt = 0.0
            for b in self._heldout:
                s, c = self._sft_loss(self.state.params, b)
                tot, cnt = tot + float(s), cnt + float(c)
            loss = tot / max(cnt, 1.0)
            return {"step": step, "domains": {"heldout": {"loss": loss}}, "score": -loss,
                    "flat": {"heldout/loss": loss}}
        if self._eval_prompts is None:
            self._eval_prompts = E.heldout_prompts(cfg, self.tok, B.stage_domains(cfg))
        e = cfg.eval
        res = E.evaluate(self.parts.engine, self.tok, self._eval_prompts, self.parts.scorers, k=e.k,
                         max_new_tokens=e.max_response_len or cfg.rollout.max_response_len,
                         temperature=0.0 if e.greedy else e.temperature, top_p=e.top_p,
                         top_k=e.top_k, seed=e.seed)
        return {"step": step, **res}

    def _heldout_sft(self) -> list:
        """Held-out SFT batches (``ceil(eval.prompts / data.batch_rows)`` of them): the tiny
        sources regenerated with ``data.shuffle_seed = eval.seed`` (different examples). File
        sources have no held-out split here: empty (no SFT eval)."""
        from cascade_jax import data

        cfg = self.config
        if any(s.format != "tiny" for s in cfg.data.sources):
            return []
        c = C.replace_path(cfg, "data.shuffle_seed", cfg.eval.seed)
        it = data.sft_batches(c, self.tok)
        n = max(1, math.ceil(cfg.eval.prompts / cfg.data.batch_rows))
        return [jax.tree.map(jnp.asarray, next(it)) for _ in range(n)]

    def summary(self) -> dict:
        return {"final_step": int(self.state.step)}

    def close(self) -> None:
        close = getattr(self.parts.engine, "close", None)
        if close is not None:
            close()
