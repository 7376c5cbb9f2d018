import pytest
import torch

import dsc
from dsc.runtime.cache import KVCache, cache_bytes, check_fits


def test_cache_bytes_counts_every_layer():
    spec = [{"name": f"cache.{i}.{kv}", "shape": [2, 4, 128, 64], "dtype": "torch.bfloat16"}
            for i in range(3) for kv in "kv"]
    assert cache_bytes(spec) == 6 * 2 * 4 * 128 * 64 * 2


def test_a_value_cache_that_is_the_keys_first_lanes_takes_no_memory_of_its_own():
    # Absorbed latent attention: keys [latent | rotary key] 24 wide, values the latent's 16.
    spec = [{"name": "cache.0.k", "shape": [2, 1, 8, 24], "dtype": "torch.float32"},
            {"name": "cache.0.v", "shape": [2, 1, 8, 16], "dtype": "torch.float32",
             "view_of": "cache.0.k"}]
    assert cache_bytes(spec) == 2 * 8 * 24 * 4
    cache = KVCache(spec, torch.device("cpu"), max_batch=2, max_seq=8)
    k, v = cache.tensors["cache.0.k"], cache.tensors["cache.0.v"]
    assert v.shape == (2, 1, 8, 16) and v.data_ptr() == k.data_ptr()
    k[0, 0, 3] = torch.arange(24.0)
    assert torch.equal(v[0, 0, 3], torch.arange(16.0))
    assert cache.nbytes == cache_bytes(spec)


def test_cache_larger_than_free_memory_is_refused_with_numbers():
    with pytest.raises(dsc.LimitError, match=r"needs 2.00 GiB but the GPU has 1.00 GiB free"):
        check_fits(2 * 2**30, 2**30, max_batch=64, max_seq=4096)
    check_fits(2**30, 2 * 2**30, max_batch=1, max_seq=16)  # fits: no error
