"""The model layer: everything that turns token ids into rewards, and nothing of the server.

    ensemble.py             the ensemble directory format (manifest, heads, deltas, statistics)
    backbone.py             loading a Hugging Face backbone (builtin GGUF, layer cut, deltas)
    tokenization.py         samples -> token ids: chat template, truncation policy, limits
    precision.py            bf16 matmuls over a float32 residual stream on CPU
    invariant_attention.py  batch-invariant attention for that mode
    varlen.py               packed (padding-free) batches through a varlen attention
    prefix.py               finding shared prefixes (a GRPO group's prompt), encoded once
    padding.py              right-padding token-id batches
    model.py                RewardModel: members, heads, normalisation, `load_model`
    heads.py                backend-neutral heads: normalisation, kernel launch, OOD, member statistics
    contract.py             the backend contract: Trunk (what a backend implements) and the one
                            engine loop (planner, OOM split, shared prefixes, heads, statistics)
    scoring.py              the torch trunk (packed/padded, shared prefixes) and ScoringEngine
    settings.py             the RMSERVE_* knobs of the model layer, read in one place
    errors.py               plain exceptions; the server maps them to gRPC codes
    backends.py             the --backend seam: torch, onnx, accelerate, vllm
    onnx_runtime.py         --backend onnx: an exported graph as a trunk (experimental on CUDA)
    sharded.py              --backend accelerate: one model split over a node's GPUs (experimental over GPUs)
    vllm_backend.py         --backend vllm (experimental): vLLM's pooling runner as a trunk

Both the server (`rmserve.service`) and the trainer (`rmserve.training`) build on
this package; it imports neither of them, nor grpc (import-linter checks it in CI).
Importing this package imports nothing heavy: modules are imported where used.
"""
