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
    scoring.py              ScoringEngine: batches -> forward -> last-token kernel -> results
    errors.py               plain exceptions; the server maps them to gRPC codes
    backends.py             the --backend seam: torch, onnx, accelerate, vllm
    sharded.py              --backend accelerate: one model split over a node's GPUs (device_map)
    vllm_backend.py         --backend vllm: vLLM's pooling runner, rmserve's heads on its vectors

Both the server (`rmserve.service`) and the trainer (`rmserve.training`) build on
this package; it imports neither of them, nor grpc (import-linter checks it in CI).
Importing this package imports nothing heavy: modules are imported where used.
"""
