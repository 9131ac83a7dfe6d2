"""The compute engine every analysis shares: devices, the SVD helper, the prefetching stream."""
