import platform

import pytest

from simulation.allocator import keep_freed_memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_takes_every_setting() -> None:
    assert keep_freed_memory()
