"""Qwen2.5-VL conditioning shared by the families built on it: the CPU half (``processor``: tokenizer,
image processor; ``rope``: 3-D positions), the GPU half (``encoder``) and a tiny offline folder
(``tiny``). Imports no Ray."""
