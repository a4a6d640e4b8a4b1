"""Used by both sides, each on its own copy of the checkpoint: the LLaMA config, presets, RoPE
tables, and the checkpoint readers (HuggingFace safetensors directories, GGUF files)."""
