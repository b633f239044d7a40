"""The HTTP layer: parse and validate, call one service method, serialise."""
