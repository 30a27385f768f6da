"""Custom kernels. `last_token_scores` gathers each sequence's last real token
and computes the ensemble's rewards and statistics in one launch."""

from rmserve.kernels.last_token import (
    LastTokenScores,
    last_token_scores,
    last_token_scores_reference,
)

__all__ = ["LastTokenScores", "last_token_scores", "last_token_scores_reference"]
