"""Plain rules of the product: no I/O, no protobuf, no SQL."""
