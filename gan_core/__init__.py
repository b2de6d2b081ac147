"""gan_core: the models, losses, training loop and metrics of ganflow. Plain PyTorch."""

__version__ = "0.1.0"
