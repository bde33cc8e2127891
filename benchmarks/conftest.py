"""pytest-benchmark suites of rspeft_fast (see benchmarks/NOTES.md). The session setup (Triton's interpreter
without CUDA, gpu tests, seed) is the repository's root ``conftest.py``, shared with ``tests/``."""
