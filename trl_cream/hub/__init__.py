"""Publishing CREAM iterations to the Hugging Face Hub: settings and retries, the background publisher, model cards,
and the trainer's door to them (`session`)."""

from .model_card import CardSettings
from .publisher import (
    FAILURE_MODES,
    MERGED_SUBFOLDER,
    STRATEGIES,
    HubPublisher,
    HubPushError,
    HubSettings,
    RetryPolicy,
    is_pushed,
    iteration_target,
    latest_local_iteration,
    marker_path,
    validate_settings,
)
from .session import base_model_path, publish_iteration, start
from .utils import HubArgs

__all__ = [
    "FAILURE_MODES",
    "MERGED_SUBFOLDER",
    "STRATEGIES",
    "CardSettings",
    "HubArgs",
    "HubPublisher",
    "HubPushError",
    "HubSettings",
    "RetryPolicy",
    "base_model_path",
    "is_pushed",
    "iteration_target",
    "latest_local_iteration",
    "marker_path",
    "publish_iteration",
    "start",
    "validate_settings",
]
