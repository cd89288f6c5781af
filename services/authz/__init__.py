"""authz: deny-by-default access decisions from a versioned, data-only policy."""
