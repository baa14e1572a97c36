"""`qwenforge export`: checkpoint folders out to the formats local runtimes load (GGUF + Ollama Modelfile)."""
