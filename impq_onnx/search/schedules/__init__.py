"""The N-per-iteration schedules :mod:`impq_onnx.search.schedule` registers: one module each."""
