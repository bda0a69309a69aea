"""The Step1X-Edit release folder's layout (what ``model.weights`` points at)."""

DIT_FILES = (
    "step1x-edit-v1p1-official.safetensors",
    "step1x-edit-i1258.safetensors",
    "step1x-edit-i1258-FP8.safetensors",
)
VAE_FILE = "vae.safetensors"
QWEN_DIR = "Qwen2.5-VL-7B-Instruct"
