"""Pick a front point and write it: GGUF (llama.cpp), HF safetensors, compressed-tensors (vLLM)."""
