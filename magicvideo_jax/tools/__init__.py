"""Tools that run models over datasets: precomputed VAE latents, compressed clip folders."""
