"""CE: the student alone, with (label-smoothed or soft-target) cross-entropy. The baseline every
distilled student is compared with, and how the demo teachers are trained."""

from .base import Method

METHOD = Method("ce", "fastkd.distillers.ce:CE", needs_teacher=False)
