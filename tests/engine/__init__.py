# A package (like every folder of tests/), so that this folder's conftest is imported as
# tests.engine.conftest and never shadows tests/conftest.py.
