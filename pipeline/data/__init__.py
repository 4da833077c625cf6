"""Data helpers shared by the stages: image decoding, sources, builtin datasets, WebDataset I/O.

Nothing heavy is imported here: each submodule imports what it needs (scikit-learn and
scikit-image only inside the functions that use them).
"""

# The label of an unlabelled sample, everywhere (listings, image and code batches, code shards):
# such samples carry no ``.cls`` member.
NO_LABEL = -1
