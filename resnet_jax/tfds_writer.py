"""`python -m resnet_jax.tfds_writer`: the command's name; the writer is `resnet_jax.data.tfds_writer`."""

from resnet_jax.data.tfds_writer import main

if __name__ == "__main__":
    main()
