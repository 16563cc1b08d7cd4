"""medattn: attention-guided medical image classification with expert feedback."""
__version__ = "0.1.0"
