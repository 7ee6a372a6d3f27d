"""Paged KV cache: host-side page manager and the K/V pools.

::

    from tandem_rt.paged import PageManager, OutOfPagesError, KVCache, pages_for_memory, copy_indices
"""
from tandem_rt.paged.kv_cache import KVCache, pages_for_memory
from tandem_rt.paged.page_manager import OutOfPagesError, PageManager, copy_indices

__all__ = ["PageManager", "OutOfPagesError", "KVCache", "pages_for_memory", "copy_indices"]
