"""Foreign checkpoints <-> ours: Lightning ``.ckpt`` both ways, Hugging Face safetensors export."""
