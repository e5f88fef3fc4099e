"""Training loops of the generators (library code: callbacks, no tracking or pipeline imports)."""
