"""Runtime: executes a Plan. Never imports dsc.passes or dsc.codegen (tests/test_layering.py)."""
