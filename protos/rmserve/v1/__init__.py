"""Generated protobuf/gRPC stubs for the rmserve.v1 API (see reward.proto)."""
