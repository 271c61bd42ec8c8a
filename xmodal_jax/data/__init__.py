"""tf.data/TFDS input pipelines. The only package that imports tensorflow."""
