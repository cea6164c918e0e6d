"""Inference: the one path from a model to probabilities (`predict`), ONNX Runtime sessions
and INT8 export (`onnx_models`, `export`), the uncertainty flag and Grad-CAM (`explain`).
Batch scoring's core is next door in `flowers.scoring`."""
