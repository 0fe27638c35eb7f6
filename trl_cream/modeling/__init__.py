"""What touches a model: sampling and scoring, LoRA adapters, external reward sources."""
