import pytest

import dsc
from dsc.runtime.cache import cache_bytes, check_fits


def test_cache_bytes_counts_every_layer():
    spec = [{"name": f"cache.{i}.{kv}", "shape": [2, 4, 128, 64], "dtype": "torch.bfloat16"}
            for i in range(3) for kv in "kv"]
    assert cache_bytes(spec) == 6 * 2 * 4 * 128 * 64 * 2


def test_cache_larger_than_free_memory_is_refused_with_numbers():
    with pytest.raises(dsc.LimitError, match=r"needs 2.00 GiB but the GPU has 1.00 GiB free"):
        check_fits(2 * 2**30, 2**30, max_batch=64, max_seq=4096)
    check_fits(2**30, 2 * 2**30, max_batch=1, max_seq=16)  # fits: no error
