"""onnxzip's REST merge service: FastAPI over the engine, with an embedded job store and worker pool."""
