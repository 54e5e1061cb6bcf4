"""Test helpers that ship with Flywheel: tiny random models of the real architectures (``tiny``) and
stand-ins. Nothing heavy is imported here; import the submodule you need."""
