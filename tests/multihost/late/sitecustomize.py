"""On ``PYTHONPATH``, makes worker 1 of a ``statemap.launch`` job never start.

Python imports this module before anything else; worker 1 then sleeps
instead of joining the job, like a host that never comes up.
"""

import os
import time

if os.environ.get("STATEMAP_PROCESS_ID") == "1":
    time.sleep(3600)
