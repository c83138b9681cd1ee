"""Plain-PyTorch references: the specification every kernel is tested against.

Everything here is materialised and obviously right; nothing here is fast.
"""

from __future__ import annotations
