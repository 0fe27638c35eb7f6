"""Publishing CREAM iterations to the Hugging Face Hub: settings and retries, the background publisher, model cards."""

from .publisher import (
    FAILURE_MODES,
    MERGED_SUBFOLDER,
    STRATEGIES,
    HubPublisher,
    HubPushError,
    HubSettings,
    RetryPolicy,
    base_model_path,
    is_pushed,
    iteration_target,
    latest_local_iteration,
    marker_path,
    publish_iteration,
    start,
    validate_settings,
)

__all__ = [
    "FAILURE_MODES",
    "MERGED_SUBFOLDER",
    "STRATEGIES",
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
