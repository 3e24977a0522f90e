"""Dataset builders (TFDS) and the input pipeline: clips in, global batches out."""
