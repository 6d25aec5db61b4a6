"""thawed.runtime: the checkpoint format, the lazy model, cache and generation -- the serving path.

The offline side (the compression pipeline, planning, calibration, the checkpoint writer) lives in
``thawed.runtime.compress``, which nothing on the serving path imports. Import the submodules you
need (``thawed.runtime.checkpoint``, ``thawed.runtime.compress.pipeline``, ...); this package
imports nothing heavy on its own.
"""
