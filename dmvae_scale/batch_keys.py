"""The keys of a training batch, on the bottom floor so data/, distributed/ and train/ name them alike.

A batch is a dict of tensors: image batches carry IMAGE (N x 3 x S x S in [-1, 1]) and LABEL (N, int64); a latent
cache's batches carry LATENT and LABEL; a feature source (the in-process encoder or the TeacherService) adds FEATURES,
the frozen encoder's tokens for IMAGE, one batch ahead. The stage contract (train/api.py) re-exports them.
"""
IMAGE_KEY = "image"
LABEL_KEY = "label"
LATENT_KEY = "latent"
FEATURES_KEY = "teacher_features"
