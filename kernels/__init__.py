"""Device kernels (numba-cuda): one source for the GPU and the simulator."""
