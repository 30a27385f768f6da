"""Custom kernels. `last_token_scores` gathers each sequence's last real token
and computes one member's head rewards and their mean/var/min (and the epistemic
term) in one launch."""

from rmserve.kernels.last_token import (
    LastTokenScores,
    last_token_scores,
    last_token_scores_reference,
)

__all__ = ["LastTokenScores", "last_token_scores", "last_token_scores_reference"]
