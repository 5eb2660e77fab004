"""rome_engine: the ML core of rome-gateway (no gRPC in here).

Public names:
    arch.ArchSpec, arch.spec_for          - the model-family table
    loading.load_model, loading.LoadedModel - loading a causal LM (local, hub, embedded)
    generation.generate_tokens, SamplingParams - the decode loop
    scoring.score_continuations           - log-probabilities of continuations
    engine.Engine                         - the async facade the server calls
    protocol.EngineClient                 - the interface the server is typed against (Engine implements it)
    errors.*                              - typed errors the server maps to statuses
"""

__version__ = "0.1.0"
