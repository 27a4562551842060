"""One stage's state and step: the train state, the RNG, the data iterator, the engine and
(for RL) the prompt → rollout → reward → batch path. :func:`cascade_jax.runner.loop.run_stage`
drives it; everything here is per step and holds no file I/O except :meth:`Stage.export`.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np

from cascade_jax import config as C
from cascade_jax import data
from cascade_jax import domains as D
from cascade_jax import rl
from cascade_jax import sharding
from cascade_jax.agentic.render import ChatRenderer
from cascade_jax.agentic.stage import agentic_batch, evaluate_episodes
from cascade_jax.data import save_tokenizer
from cascade_jax.runner import build as B
from cascade_jax.runner import evaluate as E
from cascade_jax.rollout import Request, RolloutError, Rollouts
from cascade_jax.rollout.packing import pack_rollouts
from cascade_jax.runner.checkpoint import export_hub, export_model_config, publish_modes
from cascade_jax.runner.errors import RolloutUnavailable
from cascade_jax.runner.faults import fault_point
from cascade_jax.runner.metrics import scalars
from cascade_jax.sharding.step import compile_reference_logprobs, reference_logprobs
from models import nemotron_h as nh
from models.nemotron_h import invariant

__all__ = ["Stage", "weight_step", "MAX_DRAWS"]

#: prompt batches drawn per step at most when dynamic filtering needs more groups
MAX_DRAWS = 4


def weight_step(label: str) -> int:
    """The trainer step of a weight-version label: ``"7"`` or ``"7-resume<t>"`` → 7."""
    return int(str(label).split("-")[0])


class Stage:
    """Per-stage state and step for ``sft``, ``grpo`` and ``mopd`` (see the loop module)."""

    def __init__(self, config: C.Config, run_dir: pathlib.Path, parts: B.Parts,
                 log: Callable[[str], None] = print):
        self.config, self.run_dir, self.parts, self.log = config, pathlib.Path(run_dir), parts, log
        self.obj = config.stage.objective
        self.dtype = B.compute_dtype(config)
        self.specs = nh.param_specs(parts.model_cfg)  # parameter roles (trainable, fp32, ...)
        # KL reference (GRPO with stage.kl_coef > 0, e.g. RLHF): the stage's starting weights,
        # frozen — an own copy, since the train step donates the state's buffers
        self.ref_params = (jax.tree.map(lambda x: jnp.array(x, copy=True),
                                        rl.compute_params(parts.params, self.specs, self.dtype))
                           if self.obj == "grpo" and config.stage.kl_coef > 0 else None)
        self._ref_fn = None
        self._route_fn = None  # unreplayed forward's experts (routing-replay metrics)
        self.state = rl.TrainState.from_config(parts.params, config.optimizer, self.specs)
        if parts.mesh is not None:  # master params and Adam moments on the params' shardings
            self.state = sharding.shard_train_state(self.state, parts.model_cfg, parts.mesh)
        parts.params = None  # the master copy in ``state`` is the one copy we keep
        self.rng = jax.random.key(config.run.seed)
        self.active_params = nh.param_counts(parts.model_cfg)[1]
        self.tok = parts.tokenizer
        self._eval_prompts = None
        self._heldout = None
        self._sft_loss = None
        self._compute = None  # (train state, its compute copy): see compute_params
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
        self.state = dataclasses.replace(self.state, params=s["params"], opt_state=s["opt_state"],
                                         step=jnp.asarray(s["step"], jnp.int32))
        self.rng = jax.random.wrap_key_data(jnp.asarray(s["rng"]))
        if data_state is not None and self.parts.data is not None:
            self.parts.data.set_state(data_state)
        if self.parts.rl is not None and int(self.state.step) > 0:
            # servers may already hold a later version of the killed run: a label outside the
            # integer order (the next sync's integer label is then accepted again)
            self.sync_weights(f"{int(self.state.step)}-resume{int(time.time())}")

    def data_state(self):
        """The data iterator's state; ``{}`` without one (an agentic stage's tasks come from its
        key)."""
        return {} if self.parts.data is None else self.parts.data.get_state()

    # ---- weights ------------------------------------------------------------------------------

    def compute_params(self):
        """The compute copy of the current weight version, cast once per version (the train
        state object: every step replaces it) and shared by the engine, the weight syncer and
        its probe, exact rollouts, the routing check and the export; at 30B each cast is a
        60 GB copy."""
        if self._compute is None or self._compute[0] is not self.state:
            self._compute = None  # drop the old version's copy before casting the new one
            self._compute = (self.state, rl.compute_params(self.state.params, self.specs, self.dtype))
        return self._compute[1]

    def sync_weights(self, label: Optional[str] = None) -> None:
        """Push the compute copy to the engine, labelled with the step (its weight version)."""
        step = int(self.state.step)
        fault_point("sync", step)
        try:
            self.parts.rl.engine.update_weights(self.compute_params(), label or str(step))
        except RolloutError as e:
            raise RolloutUnavailable(f"weight sync of step {step}: {e}") from None

    def export(self, path: pathlib.Path, write: bool = True) -> pathlib.Path:
        """The Hub export of the current weights at ``path``. Several processes: every one
        must call it (the weights are gathered from all of them, one tensor at a time), the one
        with ``write`` keeps the gathered tensors and writes; the others hold at most one
        gathered tensor at a time (at 30B: the largest expert stack, not the 60 GB model)."""
        params = self.compute_params()
        if jax.process_count() > 1:
            leaves, treedef = jax.tree.flatten(params)
            kept = []
            for leaf in leaves:
                full = multihost_utils.process_allgather(leaf, tiled=True)
                kept.append(full if write else None)
                del full
            params = jax.tree.unflatten(treedef, kept)
        if not write:
            return path
        out = export_hub(params, export_model_config(self.parts.model_cfg, self.tok), path)
        save_tokenizer(self.tok, out)
        publish_modes(out)
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
        return self.train_on(batch, info, timer)

    def train_on(self, batch: rl.RLBatch, info: dict, timer, *, sync: bool = True) -> dict:
        """One RL update on ``batch`` (its rollout ``info`` joins the metrics), then (``sync``)
        the new weights to the engine. Logs ``weight_version/trainer`` (the step whose weights
        are trained, before the update) and ``weight_version/rollout_min`` / ``_max`` (those
        that generated the batch); ``policy_lag_*`` come from the train step."""
        versions = np.asarray(batch.policy_version)
        info = {**info, "weight_version/trainer": float(int(self.state.step)),
                "weight_version/rollout_min": float(versions.min()),
                "weight_version/rollout_max": float(versions.max())}
        if self.obj == "mopd":
            info.update(self._reverse_kl(batch))
        if self.ref_params is not None:
            with timer("reference"):
                batch = self._ref_logp(batch)
        if batch.routed_experts is not None:
            with timer("routing_check"):
                info.update(self._routing_mismatch(batch))
        with timer("train"):
            self.state, m = self.parts.train_step(self.state, batch)
            # MOPD: the per-domain vectors named for the stage's teachers
            m = scalars(rl.domain_metrics(jax.block_until_ready(m), self.config.stage.teachers))
        if sync:
            with timer("sync"):
                self.sync_weights()
        return {**m, **info}

    def _requests(self, prompts, seeds, max_new_tokens=None, version: Optional[int] = None):
        """One request per prompt: the run's sampling contract with the prompt's seed."""
        sp = self.parts.sampling or B.build_sampling(self.config, self.tok)
        if max_new_tokens:
            sp = dataclasses.replace(sp, max_new_tokens=max_new_tokens)
        return [Request(prompt_ids=tuple(p.ids), domain=p.domain, metadata=p.metadata,
                        rid=f"s{int(self.state.step) if version is None else version}-{int(sd)}",
                        sampling=dataclasses.replace(sp, seed=int(sd)))
                for p, sd in zip(prompts, seeds)]

    def _generate(self, reqs):
        """Rollouts of ``reqs`` from the engine (with ``rollout.fidelity.zero_mismatch`` the engine is the
        zero-mismatch :class:`cascade_jax.rollout.exact.ExactEngine` and the trainer uses the
        same kernel-invariant model, or servers run ``--zero-mismatch`` themselves)."""
        return self.parts.rl.engine.generate(reqs)

    def _routing_mismatch(self, batch: rl.RLBatch) -> dict:
        """Rollout experts (``batch.routed_experts``) vs the trainer's unreplayed forward with the
        current weights over the response tokens (``rl.routing_mismatch``); with
        ``rollout.fidelity.zero_mismatch`` the trainer's model is the kernel-invariant one."""
        if self._route_fn is None:
            mcfg = self.parts.model_cfg
            model = invariant if self.config.rollout.fidelity.zero_mismatch else nh
            self._route_fn = jax.jit(lambda p, t, pos, seg: model.hidden_states(
                p, t, mcfg, positions=pos, segment_ids=seg, return_routed_experts=True)[1])
        used = self._route_fn(self.compute_params(), batch.tokens, batch.positions, batch.segment_ids)
        return scalars(rl.routing_mismatch(batch.routed_experts, used, batch.loss_mask))

    def _score(self, prompts, rollouts) -> np.ndarray:
        """``[n_prompts, n]`` rewards; each domain's prompts go to its scorer in one call."""
        n = self.config.rollout.sampling.n_samples
        texts = [[self.tok.decode(s.response_ids, skip_special_tokens=True) for s in g]
                 for g in rollouts.groups]
        out = np.zeros((len(prompts), n), np.float32)
        for dom in {p.domain for p in prompts}:
            idx = [i for i, p in enumerate(prompts) if p.domain == dom]
            scores = self.parts.rl.scorers[dom]([prompts[i].text for i in idx for _ in range(n)],
                                                [t for i in idx for t in texts[i]],
                                                [prompts[i].metadata for i in idx for _ in range(n)])
            out[idx] = np.asarray([s.value for s in scores], np.float32).reshape(len(idx), n)
        return out

    def _rollout_batch(self, step: int, key, timer, version: Optional[int] = None):
        """Rollouts for ``data.batch_prompts`` groups. Each draw is one ``PromptBatch`` of
        ``ceil(batch_prompts × oversample)`` prompts; with dynamic filtering only groups with
        reward variance are kept and further batches are drawn (at most ``MAX_DRAWS`` per step)
        until the batch is full; filtered groups fill any remainder (zero advantage, so they
        add no gradient). Without it the first ``batch_prompts`` groups are used. ``version``:
        the engine's weight version (default: the train state's step); pass it when the
        rollouts run beside a train step (``rollout.max_policy_lag``), which must not be read."""
        cfg = self.config
        if cfg.agentic.env:
            return self._episode_batch(step, key, timer)
        want = cfg.data.batch_prompts
        kept, spare, drawn, draws, n_var = [], [], 0, 0, 0
        while len(kept) < want and draws < (MAX_DRAWS if cfg.stage.dynamic_filtering else 1):
            prompts = E.prompts_of(next(self.parts.data))
            drawn += len(prompts)
            seeds = np.asarray(jax.random.randint(jax.random.fold_in(key, draws),
                                                  (len(prompts),), 0, 2 ** 31 - 1))
            draws += 1
            reqs = self._requests(prompts, seeds, version=version)
            with timer("rollout"):
                try:
                    ro = self._generate(reqs)
                except RolloutError as e:
                    raise RolloutUnavailable(f"rollouts of step {step + 1}: {e}") from None
            with timer("reward"):
                rewards = self._score(prompts, ro)
            flat_of = np.asarray(rl.flat_groups(rewards.reshape(-1), rewards.shape[1]))[::rewards.shape[1]]
            for item, flat in zip(zip(prompts, reqs, ro.groups, rewards), flat_of.tolist()):
                n_var += not flat
                (spare if flat and cfg.stage.dynamic_filtering else kept).append(item)
        groups = (kept + spare)[:want]
        if len(groups) < want:
            raise RuntimeError(f"step {step + 1}: {len(groups)} prompt groups < data.batch_prompts "
                               f"{want}")
        prompts = [g[0] for g in groups]
        ro = Rollouts(requests=tuple(g[1] for g in groups), groups=tuple(g[2] for g in groups))
        rewards = np.concatenate([g[3] for g in groups])
        teacher = None
        if self.obj == "mopd":
            with timer("teacher"):
                topk = cfg.stage.teacher_topk if cfg.stage.forward_kl_coef else 0
                teacher = self.parts.rl.teachers.score(ro, topk=topk)
        batch = pack_rollouts(ro, rewards, teacher_logp=teacher, layout="padded",
                              seq_len=cfg.rollout.sampling.max_prompt_len + cfg.rollout.sampling.max_response_len,
                              num_experts=self.parts.model_cfg.n_routed_experts)
        versions = np.asarray([weight_step(s.weight_version) for s in ro.samples()], np.int32)
        batch = batch.replace(policy_version=jnp.asarray(versions))  # always present: one program
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

    def _episode_batch(self, step: int, key, timer):
        """An agentic stage's rollouts (``agentic.env``): episodes of its environment, tasks and
        seeds from ``key`` (``cascade_jax.agentic.stage.agentic_batch``)."""
        seed = int(jax.random.randint(key, (), 0, 2 ** 31 - 1))
        with timer("rollout"):
            try:
                return agentic_batch(self.config, self.parts.rl.engine, self._renderer(),
                                     self.parts.sampling or B.build_sampling(self.config, self.tok),
                                     seed=seed, num_experts=self.parts.model_cfg.n_routed_experts,
                                     version_of=weight_step)
            except RolloutError as e:
                raise RolloutUnavailable(f"rollouts of step {step + 1}: {e}") from None

    def _renderer(self) -> ChatRenderer:
        return ChatRenderer(self.tok, thinking=self.config.rollout.sampling.thinking)

    def _ref_logp(self, batch: rl.RLBatch) -> rl.RLBatch:
        """``ref_logp [B, T]``: log-probs ``log softmax(z / τ)[y]`` of the batch under the
        stage's starting weights at the temperature ``τ`` of the batch's sampling contract
        (``batch.sampling.logprob_temperature``; 0 off the response tokens), for the KL term of
        ``grpo_loss``. Runs as the train step does: ``optimizer.grad_accum`` micro-batches
        (``sharding.step.reference_logprobs``) and, with a mesh, compiled for it
        (``sharding.step.compile_reference_logprobs``: the reference weights on the params'
        shardings, the batch placed as the train step places it)."""
        tau = 1.0 if batch.sampling is None else batch.sampling.logprob_temperature
        view = rl.SFTBatch(tokens=batch.tokens, positions=batch.positions,
                           segment_ids=batch.segment_ids, loss_mask=batch.loss_mask)
        mesh, accum, mcfg = self.parts.mesh, self.config.optimizer.grad_accum, self.parts.model_cfg
        if mesh is not None:
            view = self.parts.train_step.place_batch(view)
        key = (tau, tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(view)))
        fn = (self._ref_fn or {}).get(key)
        if fn is None:
            if mesh is None:
                fn = jax.jit(lambda p, b: reference_logprobs(p, b, model_cfg=mcfg, temperature=tau,
                                                             grad_accum=accum))
            else:
                fn = compile_reference_logprobs(mesh=mesh, params=self.ref_params, batch=view,
                                                model_cfg=mcfg, temperature=tau, grad_accum=accum,
                                                a2a=self.config.mesh.a2a)
            self._ref_fn = {**(self._ref_fn or {}), key: fn}
        ref = fn(self.ref_params, view)
        if mesh is not None and jax.process_count() > 1:  # back to this process's rows
            from jax.experimental import multihost_utils
            ref = multihost_utils.global_array_to_host_local_array(ref, mesh, ref.sharding.spec)
        return batch.replace(ref_logp=ref)

    def _reverse_kl(self, batch: rl.RLBatch) -> dict:
        """Per domain, the sampled reverse-KL estimate ``mean_t(log π_student(y_t) −
        log π_teacher(y_t))`` over response tokens, ``y ~ π_student`` (the rollout log-probs
        are the student's; MOPD drives it down)."""
        dom = np.asarray(batch.domain_ids)
        mask = np.asarray(batch.loss_mask)
        diff = (np.asarray(batch.rollout_logp) - np.asarray(batch.teacher_logp)) * mask
        out = {}
        for d in sorted(set(dom.tolist())):
            rows = dom == d
            out[f"mopd/reverse_kl/{D.domain_name(d)}"] = float(diff[rows].sum()
                                                              / max(mask[rows].sum(), 1.0))
        return out

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
        if cfg.agentic.env:
            res = evaluate_episodes(cfg, self.parts.rl.engine, self._renderer(),
                                    self.parts.sampling or B.build_sampling(cfg, self.tok))
            return {"step": step, **{k: v for k, v in res.items() if k != "rewards"}}
        if self._eval_prompts is None:
            self._eval_prompts = E.heldout_prompts(cfg, self.tok, B.stage_domains(cfg))
        e = cfg.eval
        res = E.evaluate(self.parts.rl.engine, self.tok, self._eval_prompts, self.parts.rl.scorers, k=e.k,
                         max_new_tokens=e.max_response_len or cfg.rollout.sampling.max_response_len,
                         temperature=e.temperature, top_p=e.top_p,
                         top_k=e.top_k, seed=e.seed)
        return {"step": step, **res}

    def _heldout_sft(self) -> list:
        """Held-out SFT batches (``ceil(eval.prompts / data.batch_rows)`` of them): the tiny
        and generated sources regenerated with ``data.shuffle_seed = eval.seed`` (different
        examples). File sources have no held-out split here: empty (no SFT eval)."""
        cfg = self.config
        if any(s.format not in ("tiny", "generated") for s in cfg.data.sources):
            return []
        c = C.replace_path(cfg, "data.shuffle_seed", cfg.eval.seed)
        it = data.sft_batches(c, self.tok)
        n = max(1, math.ceil(cfg.eval.prompts / cfg.data.batch_rows))
        return [jax.tree.map(jnp.asarray, next(it)) for _ in range(n)]

    def summary(self) -> dict:
        return {"final_step": int(self.state.step)}

    def close(self) -> None:
        close = None if self.parts.rl is None else getattr(self.parts.rl.engine, "close", None)
        if close is not None:
            close()
