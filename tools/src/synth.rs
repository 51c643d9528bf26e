//! Deterministic random HuggingFace checkpoints with official LLaMA-2 shapes.
