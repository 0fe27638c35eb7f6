"""Seeing what each round did: the completions tables in the trackers (`trackers`) and the run's page
(`trl-cream inspect`, `page`), both built from a round's prompts seen one by one (`rounds`)."""

from .trackers import log_completions

__all__ = ["log_completions"]
