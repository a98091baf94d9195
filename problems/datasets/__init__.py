"""Data sets: torchvision-backed images, locally generated MNIST-1D, and DeepOBS synthetic data."""
