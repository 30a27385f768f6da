"""The server: gRPC and HTTP doors over one scoring core, the scheduler, registry,
run monitor, metrics and wiring. Imports the model layer (`rmserve.service.engine`) and
the shared data layer (`rmserve.service.data`), never `rmserve.training`."""
