"""A stand-in for `srun --nodes=N --ntasks-per-node=1` on one machine: run the command N times at
once, as N "nodes", and exit with the first failure's status once all have ended (0 if none failed).

    python tests/support/local_nodes.py 2 torchrun --nnodes=2 ... -m training.train --config RUN.json

Each copy gets FOUNDRY_TEST_NODE=<i>. A node that fails makes the others pointless (their
rendezvous or collectives would wait for it), so they are terminated; SIGTERM and SIGINT are
passed on to every node.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit() or int(argv[0]) < 1:
        print("usage: local_nodes.py N COMMAND [ARGS...]", file=sys.stderr)
        return 2
    nodes = [subprocess.Popen(argv[1:], env={**os.environ, "FOUNDRY_TEST_NODE": str(i)}) for i in range(int(argv[0]))]

    def forward(signum, _frame):  # as srun does: a cancelled build stops every node
        for p in nodes:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    failed = 0
    while any(p.poll() is None for p in nodes):
        if not failed:
            failed = next((p.returncode for p in nodes if p.returncode not in (None, 0)), 0)
            if failed:
                for p in nodes:
                    if p.poll() is None:
                        p.terminate()
        time.sleep(0.05)
    return failed or next((p.returncode for p in nodes if p.returncode), 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
