"""dmvae-scale: distributed training of Distribution-Matching VAEs and latent diffusion transformers."""

__version__ = "0.1.0"
