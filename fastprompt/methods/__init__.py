"""Parameter-efficient methods; importing this package registers every method."""

from fastprompt.methods import adapter, bitfit, ept, fpt, linear, lora, vpt  # noqa: F401
from fastprompt.methods.registry import available_methods, register_method

__all__ = ["available_methods", "register_method"]
