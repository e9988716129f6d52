"""The diffusion math (schedule, forward process, losses, ELBO), the samplers and guidance, the training noise stream."""
