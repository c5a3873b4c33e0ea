"""Session stores. Each moves bytes for a storage key, with an expiry."""

from __future__ import annotations

from .base import Backend
from .base import Record

__all__ = ["Backend", "Record"]
