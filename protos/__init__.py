"""Wire schema (protos/epwatch.proto) and its generated Python stubs."""
