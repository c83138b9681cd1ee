"""fastprompt: parameter-efficient prompt tuning of frozen ViTs at high resolution."""

from fastprompt._compat import import_torchvision

import_torchvision()

from fastprompt.engine import Engine  # noqa: E402
from fastprompt.methods.ept import ept_scales  # noqa: E402
from fastprompt.methods.fpt import FPT  # noqa: E402
from fastprompt.patch import apply, available_methods, count_parameters, merge  # noqa: E402

__version__ = "0.1.0"

__all__ = ["FPT", "Engine", "__version__", "apply", "available_methods", "count_parameters", "ept_scales", "merge"]
