# A package, so that every test module is imported by its place (tests.memory.test_protocol, ...)
# and the shared helpers in tests/helpers/ as `from tests.helpers.procs import ...`: pytest puts the
# repository root (the folder above this package) on sys.path, and no test adds tests/ to it by hand.
