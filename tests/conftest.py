"""Shared test settings: offline Hub, one torch thread per test process, an image cache of each test's own, and a
diffusers module cache of each pytest process's own.

The suite runs in two pytest-xdist workers (``-n 2 --dist loadfile``: a file's tests, and its module fixtures, stay in
one worker), one torch thread each. Several torch processes sharing 2 cores with 2 threads each run many times slower
than with one thread each (thread oversubscription), and the end-to-end tests start subprocesses.
"""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# custom_pipeline="munba" copies the pipeline file into diffusers' module cache: a folder of this process's own (set
# before diffusers is imported, which reads it once), so that two workers never write the same file at once and the
# user's ~/.cache/huggingface/modules is left alone
os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="munba-test-hf-modules-")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("MUNBA_TEST_THREADS", "1")))


import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _no_image_cache_in_home(tmp_path_factory):
    """MUNBA_CACHE_DIR in pytest's temporary folder for the whole session (module fixtures included, and the
    subprocesses tests start): nothing is written into the user's ~/.cache/munba_diffusion."""
    previous = os.environ.get("MUNBA_CACHE_DIR")
    os.environ["MUNBA_CACHE_DIR"] = str(tmp_path_factory.mktemp("munba-image-cache"))
    yield
    if previous is None:
        os.environ.pop("MUNBA_CACHE_DIR", None)
    else:
        os.environ["MUNBA_CACHE_DIR"] = previous


@pytest.fixture(autouse=True)
def _own_image_cache(tmp_path_factory, monkeypatch):
    """Each test starts with an empty image cache of its own, so no test reuses another's images."""
    monkeypatch.setenv("MUNBA_CACHE_DIR", str(tmp_path_factory.mktemp("munba-image-cache")))
