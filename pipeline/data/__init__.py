"""Data helpers shared by the stages: image decoding, sources, builtin datasets, WebDataset I/O.

Nothing heavy is imported here: each submodule imports what it needs (scikit-learn and
scikit-image only inside the functions that use them).
"""
