"""Side-by-side benchmarks against torch.nn + autograd: ``python -m benchmarks.compare``."""
