"""Shared test settings: offline Hub, and one torch thread per test process.

Several torch processes sharing 2 cores with 2 threads each run many times slower than with one thread each
(thread oversubscription), and the end-to-end tests start subprocesses.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("MUNBA_TEST_THREADS", "1")))
