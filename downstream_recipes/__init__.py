"""Package data of s3prl-ekd (see s3prl_ekd/io/resources.py)."""
