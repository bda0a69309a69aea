"""step1x-batch: dataset-scale instruction image editing on Ray."""

__version__ = "0.1.0"
