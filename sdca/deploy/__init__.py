"""Deployment: ONNX export (needs torch) and inference over folders and videos (ONNX Runtime needs no torch)."""
