"""On ``PYTHONPATH``, makes worker 1 of a ``statemap.launch`` job die by SIGKILL at start-up.

Python imports this module before anything else, so worker 1 dies before
it imports JAX and worker 0 is stopped while it is still starting: the
launch's handling of a killed worker costs no JAX start-ups.
"""

import os
import signal

if os.environ.get("STATEMAP_PROCESS_ID") == "1":
    print("worker 1 about to fail", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
