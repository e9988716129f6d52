"""The networks: the UNet, the frozen text encoder and VAE, the noisy classifier, the trained autoencoder."""
