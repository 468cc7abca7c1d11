"""data: shard writing, the streaming reader and its transforms, the latent cache. Knows nothing of training.

    builtin.py     Fashion-MNIST from Debian's files; ImageArrayDataset (in memory, the batch contract)
    shard_sources.py what `data shards` reads: ImageNet-style folders, built-in sets
    storage.py     local directories and s3:// URLs (fsspec/s3fs, S3_ENDPOINT_URL), fast endpoint check
    shards.py      `data shards`: resumable, parallel MDS conversion; load_index (missing shards named)
    transforms.py  decoding, random / center / ADM crops, flips seeded by (seed, epoch, sample)
    stream.py      ImageStreamDataset (StreamingDataset), make_loader (resumable StreamingDataLoader)
    latents.py     `data cache-latents` and LatentStreamDataset
    verify.py      `data verify`
    datasets.py    DataConfig -> the dataset a stage reads

Batch contract for every stage: {"image": float (3, S, S) in [-1, 1], "label": long}, or from a latent cache
{"latent": float (C, h, w) raw (normalise with the dataset's latent_spec), "label": long}.
"""
