"""Per-stage export of a LowDiff model: ONNX graphs (and TensorRT engines built from them).

``lowdiff export --format onnx|tensorrt --out DIR`` writes one file per cascade stage plus
``manifest.json`` (export/manifest.py); the engines package loads such a folder. See
export/onnx_stages.py for what a stage graph is and export/tensorrt_build.py for TensorRT
(written against its documentation, never run here).
"""
