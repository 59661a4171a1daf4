"""Export stage: ONNX graphs with a manifest and parity checks; fp16 / int8 variants; TensorRT engines."""
