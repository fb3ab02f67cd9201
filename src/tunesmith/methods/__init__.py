"""Fine-tuning methods (which parameters train). Importing this package registers them all."""

from tunesmith.methods import adapter, full, lora, prefix, prompt  # noqa: F401  (registration)
from tunesmith.methods.base import Method, build_method, method_config, method_names

__all__ = ["Method", "build_method", "method_config", "method_names"]
