"""An open framework for training text-to-image diffusion models at scale."""
__version__ = "0.1.0"
