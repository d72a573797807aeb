"""sdca_serve: run models exported by `sdca export --onnx` with ONNX Runtime, alone or behind HTTP.

Needs onnxruntime, numpy and Pillow (plus FastAPI and uvicorn for the service); never torch or the training
code, so it installs on its own (``pip install ./serve``). ``python -m sdca_serve model.onnx`` starts the service.
"""
__version__ = "0.1.0"
