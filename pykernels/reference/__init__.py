"""Plain-PyTorch references: the oracle of the tests and the last fallback backend."""
