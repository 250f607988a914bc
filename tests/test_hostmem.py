"""hostmem: freed heap memory goes back to the system (glibc only)."""

import subprocess
import sys
import textwrap

import pytest

from purld_jax import hostmem

_CHILD = textwrap.dedent("""
    import numpy as np
    from purld_jax import hostmem
    def rss_mb():
      with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024
    # 3200 buffers of 64 KiB (under glibc's mmap threshold: they come from
    # the heap), each touched, then every other one freed: the heap cannot
    # shrink from its top, only malloc_trim hands the holes back.
    bufs = [np.ones(1 << 13) for _ in range(3200)]  # 8 B x 8192 = 64 KiB
    del bufs[::2]
    before = rss_mb()
    hostmem.release()
    print(before, rss_mb())
""")


@pytest.mark.skipif(hostmem._libc() is None, reason="libc is not glibc")
def test_release_hands_freed_heap_memory_back():
  """1600 freed buffers of 64 KiB = 100 MiB: release() lowers RSS by most
  of it (the freed pages themselves)."""
  out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True,
                       text=True, check=True).stdout.split()
  before, after = map(float, out)
  assert before - after > 80, (before, after)


def test_configure_fixes_the_mmap_threshold():
  assert hostmem.configure() == (hostmem._libc() is not None)
