"""Runnable recipes: AdamW LoRA vs Langevin LoRA on real tasks (offline by default)."""
