"""A torch.distributed peer for weight broadcasts, run as its OWN process by an interpreter that
has torch (never imported by the trainer or the JAX server; it imports nothing of the project).

    python torch_peer.py --init tcp://ADDR:PORT --rank R --world-size W --group-name NAME --backend gloo

It joins a process group the way SGLang's ``init_custom_process_group`` does (TCP rendezvous,
store prefixed with the group name, a non-default group), then serves commands, one JSON object
per line on stdin, answering one JSON line on stdout::

    {"op": "broadcast", "file": PATH, "dtype": "bfloat16", "numel": N}  ->  {"ok": true, "seconds": s}
    {"op": "exit"}

``broadcast`` maps ``PATH`` (a tmpfs file of exactly ``N`` elements, shared with the parent)
and runs ``broadcast(buf, src=0)`` on it in place: rank 0 sends the file's bytes, every other
rank receives into it. Errors answer ``{"ok": false, "error": ...}`` and the peer keeps serving.
"""

import argparse
import datetime
import json
import mmap
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def init_group(init: str, rank: int, world_size: int, group_name: str, backend: str, timeout_s: float):
    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world_size = next(c10d.rendezvous(init, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    prefix_store = c10d.PrefixStore(group_name, store)
    pg, _ = c10d._new_process_group_helper(world_size, rank, [], backend, prefix_store,
                                           group_name=group_name, backend_options=None, timeout=timeout)
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def broadcast(pg, path: str, dtype: str, numel: int) -> float:
    dt = DTYPES[dtype]
    nbytes = numel * torch.empty((), dtype=dt).element_size()
    with open(path, "r+b") as f:
        if os.fstat(f.fileno()).st_size != nbytes:
            raise ValueError(f"{path}: {os.fstat(f.fileno()).st_size} bytes, expected {nbytes}")
        mm = mmap.mmap(f.fileno(), nbytes) if nbytes else None
    try:
        buf = torch.frombuffer(mm, dtype=dt, count=numel) if nbytes else torch.empty(0, dtype=dt)
        t0 = time.perf_counter()
        dist.broadcast(buf, src=0, group=pg)
        seconds = time.perf_counter() - t0
        del buf
        if mm is not None:
            mm.flush()
        return seconds
    finally:
        if mm is not None:
            mm.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--group-name", default="weight_update_group")
    ap.add_argument("--backend", default="gloo")
    ap.add_argument("--timeout-s", type=float, default=600.0)
    args = ap.parse_args()
    out = sys.stdout
    try:
        pg = init_group(args.init, args.rank, args.world_size, args.group_name, args.backend, args.timeout_s)
    except Exception as e:  # report and exit: the parent turns this into an HTTP / sync error
        out.write(json.dumps({"ok": False, "error": f"init_group: {type(e).__name__}: {e}"}) + "\n")
        out.flush()
        sys.exit(1)
    out.write(json.dumps({"ok": True, "ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        try:
            cmd = json.loads(line)
            if cmd.get("op") == "exit":
                break
            if cmd.get("op") != "broadcast":
                raise ValueError(f"unknown op {cmd.get('op')!r}")
            seconds = broadcast(pg, cmd["file"], cmd["dtype"], int(cmd["numel"]))
            reply = {"ok": True, "seconds": seconds}
        except Exception as e:
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    try:
        dist.destroy_process_group(pg)
    except Exception:
        pass


if __name__ == "__main__":
    main()
