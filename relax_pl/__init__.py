"""relax_pl: RL with verifiable rewards on PyTorch Lightning, with ReLaX latent exploration."""
