"""Test set-up: 8 simulated CPU devices, no network, warnings as errors, one
compilation cache per session."""

import atexit
import os
import shutil
import socket
import tempfile

# Must happen before jax is imported anywhere: lets the sharding/pmap tests
# run on one CPU as 8 devices; single-device tests use device 0 as usual.
# The tests' programs are tiny and compiled once each, so XLA's compile time
# dominates: without LLVM's expensive optimisation passes the suite ran
# 25-33% faster (same tests, same results; measured 2026-12-01 on 2 CPUs).
os.environ.setdefault(
  'XLA_FLAGS',
  '--xla_force_host_platform_device_count=8 '
  '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true',
)
os.environ['HF_HUB_OFFLINE'] = '1'
# One persistent compilation cache for the session, made by the first process
# that imports this file (pytest-xdist's workers inherit it) and removed when
# that process exits: a program another test (or worker) already compiled to
# the same computation is loaded, not compiled again. tests/methods ran in
# 178 s against 204 s without it (cold cache, 2 workers, 2026-12-02, 2 CPUs).
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='peft_jax_xla_')
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], True)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import pytest

from tests import durations


class NetworkBlocked(RuntimeError):
  pass


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  """Any attempt to open a non-local connection fails the test."""
  connect = socket.socket.connect

  def guarded(sock, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and host not in ('localhost', '127.0.0.1', '::1'):
      raise NetworkBlocked(f'test tried to reach the network: {address!r}')
    return connect(sock, address)

  monkeypatch.setattr(socket.socket, 'connect', guarded)


# A check repeated on several Llama layouts (``layout`` parameter: unrolled,
# scan, scan_remat) runs on one of them in the fast suite, the one with the
# most to get wrong (scan_remat, else scan: per-layer slicing under nn.scan),
# and on all of them in `make test`: the repetition, not the coverage, is
# what `make test-fast` leaves out.
LAYOUT_PREFERENCE = ('scan_remat', 'scan', 'unrolled')


def pytest_collection_modifyitems(config, items):
  del config
  measured_slow = durations.read_list()
  for item in items:
    if item.nodeid in measured_slow:
      item.add_marker(pytest.mark.slow)
  layouts: dict[tuple[str, str], set[str]] = {}
  for item in items:
    layout = getattr(item, 'callspec', None) and item.callspec.params.get('layout')
    if layout:
      layouts.setdefault((item.path, item.originalname), set()).add(layout)
  for item in items:
    layout = getattr(item, 'callspec', None) and item.callspec.params.get('layout')
    if not layout:
      continue
    present = layouts[(item.path, item.originalname)]
    fast = next((name for name in LAYOUT_PREFERENCE if name in present), layout)
    if layout != fast:
      item.add_marker(pytest.mark.slow)
