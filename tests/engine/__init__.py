# A package, so that this folder's conftest is imported as engine.conftest and never
# shadows tests/conftest.py (which other tests import as plain `conftest`).
