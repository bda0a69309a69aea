"""Step1X-Edit, native PyTorch: DiT, connector, VAE, Qwen2.5-VL conditioner, pipeline.

Imports no Ray: this package runs on GPU machines that have only torch and transformers.
"""
