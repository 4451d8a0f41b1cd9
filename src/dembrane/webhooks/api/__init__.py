"""The gRPC surface: servicers, interceptors, conversions and error statuses."""
