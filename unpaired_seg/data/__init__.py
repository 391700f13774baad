"""Datasets on disk: manifest, NIfTI I/O, the embedded phantom and the input pipeline."""
