"""thawed.runtime: the checkpoint format, the compression pipeline, the lazy model, cache and generation.

Import the submodules you need (``thawed.runtime.checkpoint``, ``thawed.runtime.writer``, ...);
this package imports nothing heavy on its own.
"""
