"""Several CPU processes from ``accelerate launch``, for the trainer and the index command alike.

Decisions:

- Without MPI, accelerate's launcher (1.x) starts ONE process for ``--cpu --num_processes N`` (its multi-CPU path is
  ``mpirun``), and so it does on a machine with no GPU without ``--cpu``; it exports ``MASTER_ADDR`` when N > 1. Such
  a process (on the CPU, a master address, no rank variables) finds N on its launcher's command line
  (:func:`requested_cpu_processes`) and starts the N processes itself with torchrun's launcher on accelerate's master
  address and port (:func:`launch_cpu_processes`). ``torchrun --nproc_per_node N`` and ``accelerate launch
  --multi_gpu --num_processes N`` on a machine without a GPU start them directly. All use gloo on the CPU.
- The library never imports accelerate: the launcher's command line is parsed here (``--num_processes N`` and
  ``--num_processes=N``, also with a hyphen).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

# set in a process that a multi-process launcher (torchrun, accelerate, MPI) started among several
_RANK_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def requested_cpu_processes(parent_cmdline: list[str] | None = None) -> int:
    """The N of ``accelerate launch --cpu --num_processes N`` when accelerate started this process alone, else 1.

    Without MPI, accelerate's launcher starts one process for ``--cpu`` whatever ``--num_processes`` says (its
    multi-CPU path is ``mpirun``); it exports ``MASTER_ADDR`` when N > 1. Such a process (on the CPU, a master
    address, no rank variables) reads N from its launcher's command line (``/proc/<parent>/cmdline`` unless given).
    Parsed here, without importing accelerate (the library never does)."""
    env = os.environ
    cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    if not cpu or "MASTER_ADDR" not in env or any(v in env for v in _RANK_VARIABLES):
        return 1
    if parent_cmdline is None:
        try:
            raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
        except OSError:
            return 1
        parent_cmdline = [part.decode(errors="replace") for part in raw.split(b"\0") if part]
    starts = [i for i, part in enumerate(parent_cmdline) if part in ("launch", "accelerate.commands.launch")]
    if not starts:
        return 1
    words = parent_cmdline[starts[0] + 1 :]
    for i, word in enumerate(words):
        for flag in ("--num_processes", "--num-processes"):
            value = word[len(flag) + 1 :] if word.startswith(flag + "=") else None
            if word == flag and i + 1 < len(words):
                value = words[i + 1]
            if value is not None:
                return max(1, int(value)) if value.isdigit() else 1
    return 1


def launch_cpu_processes(n: int, module: str, argv: list[str], what: str = "") -> int:
    """Start ``n`` processes of ``python -m module argv`` on this machine with torchrun's launcher, on accelerate's
    ``MASTER_ADDR`` / ``MASTER_PORT`` (gloo on the CPU); 0 when all of them succeed, else 1. ``what`` names the
    processes in the failure message ("training", "indexing")."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), os.environ.get("MASTER_PORT", "29500")
    print(f"accelerate started one process on the CPU: starting {n} (gloo, {addr}:{port})", file=sys.stderr)
    args = get_args_parser().parse_args(
        ["--nnodes", "1", "--nproc_per_node", str(n), "--master_addr", addr, "--master_port", port]
        + ["--module", module, *argv]
    )
    try:
        run(args)
    except ChildFailedError as e:
        print(f"error: {len(e.failures)} of {n} {what + ' ' if what else ''}processes failed", file=sys.stderr)
        return 1
    return 0
