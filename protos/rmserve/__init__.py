"""rmserve: reward-model ensemble serving for RLHF.

Subpackages: `rmserve.client` (SDK, no torch), `rmserve.service` (gRPC server,
scheduler, engine), `rmserve.kernels` (Triton last-token scoring),
`rmserve.training` (Bradley-Terry training and evaluation), `rmserve.v1`
(generated protobuf stubs).
"""

__version__ = "0.1.0"
