"""The test suite, a package (as each of its folders) so that a module is imported by its full name
(tests.ops.test_moe): basenames may repeat across folders, a module imported by another test is imported once,
and plain `pytest` finds the shared helpers (tests._tolerance, tests._launches, ...)."""
