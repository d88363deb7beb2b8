"""``kd-dist train`` with a count, per optimizer step, of the collectives called through
torch.distributed's Python functions and of the host waits kd_dist's own code asks for
(``.tolist()``, ``.item()``, ``int()``, ``float()``, ``bool()`` of a tensor).

Run it like ``python -m kd_dist train`` (under torchrun for several ranks), with STEP_WAITS=PATH:
every rank writes PATH.rank<RANK>, a JSON list with one entry per optimizer step,
``{"collectives": n, "host_waits": n, "seconds": s}``, each counted from one step boundary
(``faults.after_step``, called once per step) to the next; the first entry also holds the
start-up. Not counted: what torch runs in C++ (DDP's gradient all-reduce and buffer broadcast,
DeepSpeed's own collectives) and the waits that torch's operators make without being asked
(e.g. a boolean mask's indexing). (A test helper, not a test module: see
test_distributed_faults.py.)
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist

from kd_dist import faults
from kd_dist.cli import main

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object",
               "broadcast", "broadcast_object_list", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "gather", "scatter", "all_to_all", "barrier")  # fmt: skip
HOST_WAITS = ("tolist", "item", "__int__", "__float__", "__bool__")

counts = {"collectives": 0, "host_waits": 0}


def counted(kind: str, function, from_kd_dist_only: bool = False):
    def wrapper(*args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if not from_kd_dist_only or caller.startswith("kd_dist"):
            counts[kind] += 1
        return function(*args, **kwargs)

    return wrapper


for name in COLLECTIVES:
    setattr(dist, name, counted("collectives", getattr(dist, name)))
for name in HOST_WAITS:
    setattr(torch.Tensor, name, counted("host_waits", getattr(torch.Tensor, name), True))

steps: list[dict[str, float]] = []
since = {"seconds": time.perf_counter(), **counts}
step_boundary = faults.after_step


def after_step(step: int) -> None:
    now = time.perf_counter()
    steps.append({kind: counts[kind] - since[kind] for kind in counts})
    steps[-1]["seconds"] = now - since["seconds"]
    since.update(counts, seconds=now)
    step_boundary(step)


faults.after_step = after_step
code = main(["train", *sys.argv[1:]])
with open(f"{os.environ['STEP_WAITS']}.rank{os.environ.get('RANK', '0')}", "w") as handle:
    json.dump(steps, handle)
sys.exit(code)
