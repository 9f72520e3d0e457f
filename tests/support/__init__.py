"""What the tests and the benchmarks share: real servers to start, helpers to drive them, documents to send."""
