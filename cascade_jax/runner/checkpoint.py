"""Training checkpoints with orbax, and Hub-layout exports.

A checkpoint at step ``s`` (directory ``<run_dir>/checkpoints/<s>/``) holds the items

* ``state`` — ``{"params", "opt_state", "step", "rng"}``: fp32 master weights, the optax state,
  the number of optimiser updates and the raw key data of the run's RNG (orbax ``StandardSave``);
* ``data``  — the data iterator's state (JSON), so the resumed run draws the same next batch;
* ``meta``  — JSON: step, per-domain eval scores of that step (if evaluated), wall time.

Saves are asynchronous (orbax writes in a background thread after copying the arrays to the
host; the step is blocked only for that copy — :meth:`Checkpointer.save` returns the blocked
seconds). Orbax writes into a temporary directory and renames it when complete, so a process
killed mid-save leaves the previous checkpoints intact and the partial one is ignored (and
cleaned up at the next start).

Multi-process jobs: every process calls save and restore (orbax coordinates the writes);
leaves held by one process alone (the RNG key, counters) are written as arrays replicated on
every device and read back into their own placement; ``data`` holds every process's iterator
state (``{"per_process": [...]}``, each reads its own shard of the data).

Retention: the last ``keep_last`` checkpoints plus the ``keep_best`` with the highest mean eval
score (checkpoints without eval scores count only as "last").

Restore (:meth:`Checkpointer.restore_latest`) tries the newest checkpoint first; one that fails
to load (corrupt or partial files) is moved to ``<run_dir>/checkpoints.corrupt/`` with a message
and the next older one is tried.
"""

from __future__ import annotations

import base64
import pathlib
import shutil
import time
from typing import Any, Optional

import jax
import numpy as np

from cascade_jax.runner.errors import CheckpointLoadError
from models import nemotron_h as nh

__all__ = ["Checkpointer", "export_hub", "export_model_config", "publish_modes",
           "encode_data_state", "decode_data_state"]


def encode_data_state(state: Any) -> Any:
    """A data-iterator state as JSON (``bytes`` become ``{"__bytes__": base64}``)."""
    if isinstance(state, bytes):
        return {"__bytes__": base64.b64encode(state).decode()}
    if isinstance(state, dict):
        return {k: encode_data_state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [encode_data_state(v) for v in state]
    if isinstance(state, np.generic):
        return state.item()
    return state


def decode_data_state(state: Any) -> Any:
    """Inverse of :func:`encode_data_state`."""
    if isinstance(state, dict):
        if set(state) == {"__bytes__"}:
            return base64.b64decode(state["__bytes__"])
        return {k: decode_data_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [decode_data_state(v) for v in state]
    return state


def _host_local(x) -> bool:
    """A leaf orbax cannot write in a multi-process job: a ``jax.Array`` held by this process
    alone (the RNG key, a step counter; the parameters are global arrays on the mesh)."""
    return isinstance(x, jax.Array) and jax.process_count() > 1 and x.is_fully_addressable


def _replicated():
    """A sharding replicating a value on every device of every process."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    return NamedSharding(Mesh(np.asarray(jax.devices()), ("all",)), PartitionSpec())


def _to_global(x):
    """A host-local leaf as a global array replicated on every device (every process holds the
    same value: the state is the same on all of them); other leaves as they are."""
    if not _host_local(x):
        return x
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, _replicated(), lambda idx: value[idx])


def _gather_json(obj) -> list:
    """``obj`` (JSON-able) of every process, in process order (a collective: every process
    calls it)."""
    import json

    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int64)))
    sizes = sizes.reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:raw.size] = raw
    every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(every, sizes)]


def _eval_metric(metrics) -> float:
    return float(metrics["eval_score"])


class Checkpointer:
    """Orbax ``CheckpointManager`` over ``<run_dir>/checkpoints`` (see the module docstring)."""

    def __init__(self, run_dir: pathlib.Path, *, keep_last: int = 3, keep_best: int = 1,
                 async_save: bool = True):
        import orbax.checkpoint as ocp
        from orbax.checkpoint import checkpoint_managers as cm

        self.run_dir = pathlib.Path(run_dir)
        self.directory = (self.run_dir / "checkpoints").absolute()
        policies = [cm.LatestN(n=max(keep_last, 1))]
        if keep_best > 0:
            policies.append(cm.BestN(get_metric_fn=_eval_metric, n=keep_best,
                                     keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=cm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
        self._ocp = ocp
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    # -- saving ---------------------------------------------------------------------------------

    def save(self, step: int, state: dict, data_state: Any, meta: dict,
             eval_score: Optional[float] = None) -> float:
        """Start saving; returns the seconds the caller was blocked."""
        a = self._ocp.args
        t0 = time.perf_counter()
        state = jax.tree.map(_to_global, state)
        data = encode_data_state(data_state)
        if jax.process_count() > 1:  # each process reads its own shard of the data
            data = {"per_process": _gather_json(data)}
        self.manager.save(
            step,
            args=a.Composite(state=a.StandardSave(state),
                             data=a.JsonSave(data),
                             meta=a.JsonSave({**meta, "step": int(step)})),
            metrics=None if eval_score is None else {"eval_score": float(eval_score)},
            force=True)
        return time.perf_counter() - t0

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    # -- restoring ------------------------------------------------------------------------------

    def restore(self, step: int, target_state: dict) -> tuple[dict, Any, dict]:
        """``(state, data_state, meta)`` of checkpoint ``step``; arrays get ``target_state``'s
        shapes, dtypes and shardings. A shape mismatch raises :class:`CheckpointLoadError`."""
        a = self._ocp.args
        abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, target_state)
        read_as = jax.tree.map(  # host-local leaves were written as replicated global arrays
            lambda x, t: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_replicated())
            if _host_local(t) else x, abstract, target_state)
        out = self.manager.restore(step, args=a.Composite(state=a.StandardRestore(read_as),
                                                          data=a.JsonRestore(),
                                                          meta=a.JsonRestore()))
        state = jax.tree.map(
            lambda got, t: jax.device_put(np.asarray(got.addressable_data(0)), t.sharding)
            if _host_local(t) and tuple(got.shape) == tuple(t.shape) else got,
            out["state"], target_state)
        for path, want, got in zip(jax.tree_util.tree_flatten_with_path(abstract)[0],
                                   jax.tree.leaves(abstract), jax.tree.leaves(state)):
            if tuple(want.shape) != tuple(got.shape):
                raise CheckpointLoadError(
                    f"checkpoint {self.directory / str(step)}: "
                    f"{jax.tree_util.keystr(path[0])} has shape {tuple(got.shape)}, the "
                    f"configured model needs {tuple(want.shape)}")
        data = out["data"]
        if isinstance(data, dict) and set(data) == {"per_process"}:
            if len(data["per_process"]) != jax.process_count():
                raise CheckpointLoadError(
                    f"checkpoint {self.directory / str(step)}: written by "
                    f"{len(data['per_process'])} processes, this job has {jax.process_count()}")
            data = data["per_process"][jax.process_index()]
        return state, decode_data_state(data), out["meta"]

    def restore_latest(self, target_state: dict, log=print):
        """Newest loadable checkpoint as ``(step, state, data_state, meta)``, or ``None`` when
        there is none. Unloadable ones are moved aside (see module docstring)."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return (step, *self.restore(step, target_state))
            except CheckpointLoadError:
                raise
            except Exception as e:  # noqa: BLE001 - any read failure means a bad checkpoint
                aside = self.run_dir / "checkpoints.corrupt" / f"{step}-{int(time.time())}"
                aside.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(self.directory / str(step)), str(aside))
                log(f"checkpoint {step} does not load ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200] if str(e) else ''}); moved to {aside}, "
                    f"falling back to the previous one")
                self.manager.reload()
        return None


def export_hub(params, model_cfg, out_dir: pathlib.Path, *, tokenizer_dir=None) -> pathlib.Path:
    """Write ``params`` as a Hub-layout checkpoint (``config.json`` + safetensors) at
    ``out_dir`` with the tokenizer files of ``tokenizer_dir`` (if any) copied beside them, so
    ``load_checkpoint``, ``launch/serve.py``, SGLang and transformers load it."""
    out_dir = pathlib.Path(out_dir)
    nh.save_checkpoint(params, model_cfg, str(out_dir))
    if tokenizer_dir is not None:
        for p in pathlib.Path(tokenizer_dir).iterdir():
            if p.is_file() and (p.name.startswith("tokenizer") or p.name in
                                ("special_tokens_map.json", "chat_template.jinja",
                                 "generation_config.json")):
                if not (out_dir / p.name).exists():
                    shutil.copyfile(p, out_dir / p.name)
    return out_dir


def export_model_config(model_cfg, tokenizer):
    """``model_cfg`` with ``eos_token_id`` = the tokenizer's end-of-turn token when the chat
    template ends turns with it (the tiny template: ``<|im_end|>``, id 4, where the preset says
    ``</s>``, id 2), so servers loading the export stop at the end of an assistant turn."""
    import dataclasses

    eos_tok = tokenizer.special_tokens.get("eos_token")
    eos = tokenizer.eos_id
    if eos is None or not eos_tok or eos_tok not in (tokenizer.chat_template or ""):
        return model_cfg
    cur = model_cfg.eos_token_id
    cur = tuple(cur) if isinstance(cur, (list, tuple)) else (cur,)
    if eos in cur:
        return model_cfg
    return dataclasses.replace(model_cfg, eos_token_id=eos)


def publish_modes(out_dir: pathlib.Path) -> None:
    """Make an export readable like any written file: files ``0644`` and directories ``0755``
    (less what the umask removes), where temporary files had left ``0600``."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    out_dir = pathlib.Path(out_dir)
    for p in [out_dir, *out_dir.rglob("*")]:
        if p.is_symlink():
            continue
        p.chmod((0o755 if p.is_dir() else 0o644) & ~mask)
