"""tunesmith's built-in default: a small base model it pretrains itself, and generated tasks."""
