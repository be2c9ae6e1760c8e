"""Model adapters; importing this package registers them (no torch import at this point)."""

from edgeprune.models import llava_next  # noqa: F401
