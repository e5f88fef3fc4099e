"""The test suite as a package: `tests.*` imports must not resolve to a same-named package that a
dependency installs into site-packages (torch-fidelity ships one)."""
