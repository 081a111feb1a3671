"""SPAM and Stable-SPAM as composable optax transformations."""
from spam_optax._adaptive_clip import clip_by_running_max
from spam_optax._adaptive_clip import ClipByRunningMaxState
from spam_optax._alias import spam
from spam_optax._alias import stable_spam
from spam_optax._clip_and_norm_history import clip_by_running_max_and_grad_norm_history
from spam_optax._grad_norm_history import scale_by_grad_norm_history
from spam_optax._grad_norm_history import ScaleByGradNormHistoryState
from spam_optax._leaf_stats import LeafLayout
from spam_optax._leaf_stats import LeafStats
from spam_optax._momentum_scale import cosine_momentum_scale
from spam_optax._periodic_reset import periodic_reset
from spam_optax._periodic_reset import PeriodicResetState
from spam_optax._reset_warmup import reset_warmup_scale
from spam_optax._reset_warmup import scale_by_reset_warmup
from spam_optax._reset_warmup import ScaleByResetWarmupState
from spam_optax._scale_by_spam import scale_by_spam
from spam_optax._scale_by_spam import ScaleBySpamState
from spam_optax._sparse_moments import redraw_due
from spam_optax._sparse_moments import redraw_masks
from spam_optax._sparse_moments import replace_masks
from spam_optax._sparse_moments import sparse_moments
from spam_optax._sparse_moments import SparseMomentsState
from spam_optax._sparse_moments import uniform_mask_sampler
from spam_optax._spike_clip import spam_clip
from spam_optax._spike_clip import SpamClipState
from spam_optax._stable_spam_adam import scale_by_stable_spam_adam
from spam_optax._stable_spam_adam import ScaleByStableSpamAdamState
from spam_optax._telemetry import spike_stats
from spam_optax._weight_decay import add_decayed_weights_after_update
from spam_optax._weight_decay import AddDecayedWeightsAfterUpdateState

__all__ = (
    "add_decayed_weights_after_update",
    "AddDecayedWeightsAfterUpdateState",
    "clip_by_running_max",
    "clip_by_running_max_and_grad_norm_history",
    "ClipByRunningMaxState",
    "cosine_momentum_scale",
    "LeafLayout",
    "LeafStats",
    "periodic_reset",
    "PeriodicResetState",
    "redraw_due",
    "redraw_masks",
    "replace_masks",
    "reset_warmup_scale",
    "scale_by_grad_norm_history",
    "scale_by_reset_warmup",
    "scale_by_spam",
    "scale_by_stable_spam_adam",
    "ScaleByGradNormHistoryState",
    "ScaleByResetWarmupState",
    "ScaleBySpamState",
    "ScaleByStableSpamAdamState",
    "spam",
    "spam_clip",
    "SpamClipState",
    "sparse_moments",
    "SparseMomentsState",
    "spike_stats",
    "stable_spam",
    "uniform_mask_sampler",
)
