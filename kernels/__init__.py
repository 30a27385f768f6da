"""Custom kernels. `last_token_scores` gathers each sequence's last real token
and computes one member's head rewards and their mean/var/min (and the epistemic
term) in one launch."""

if __name__ == "kernels":
    # This folder is `rmserve.kernels`. Found as the top-level `kernels` (the checkout root is on
    # sys.path: `python -m ...` or `python -c` run from it), it would shadow Hugging Face's `kernels`,
    # which transformers imports when that distribution is installed. Hand the name over to it; where
    # it is not installed, nothing changes. tests/test_protos.py checks both imports from the root.
    import importlib.util as _util
    import os as _os
    import sys as _sys
    from importlib.machinery import PathFinder as _PathFinder

    _root = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))
    _spec = _PathFinder.find_spec(__name__, [p for p in _sys.path if _os.path.realpath(p or ".") != _root])
    if _spec is not None and _spec.loader is not None:
        _sys.modules[__name__] = _util.module_from_spec(_spec)  # what `import kernels` returns
        _spec.loader.exec_module(_sys.modules[__name__])

from rmserve.kernels.last_token import (
    LastTokenScores,
    last_token_scores,
    last_token_scores_reference,
)

__all__ = ["LastTokenScores", "last_token_scores", "last_token_scores_reference"]
