"""Analysis methods: pure functions from tensors to small typed results."""
