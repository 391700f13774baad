"""unpaired_seg: unpaired multi-modal medical image segmentation in JAX/Flax."""

__version__ = "0.1.0"
