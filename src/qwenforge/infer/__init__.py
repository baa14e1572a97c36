"""The run stage: `load` (one loader for every verb, adapted to the machine), `generation` (prompts
through the model's own chat template, streaming), `chat` (`qwenforge chat`), `generate`
(`qwenforge generate`), `server` (`qwenforge serve`), `gguf_precision` (f32 GGUF for llama.cpp)."""
