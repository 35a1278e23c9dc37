"""A deterministic, vectorised simulator of a Wide-EP cluster's hook records."""
