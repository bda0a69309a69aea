"""Qwen-Image-Edit-2511 (diffusers layout) as a model family: ``family`` (light), ``prepare``
(CPU, no torch), ``pipeline`` (GPU engine + in-process pipeline), ``tiny`` (toy weights)."""
