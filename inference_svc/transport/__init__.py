"""gRPC transport: proto <-> engine types, servicers, and the error interceptor."""
