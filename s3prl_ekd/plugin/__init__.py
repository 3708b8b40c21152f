"""The s3prl plugin: pretraining task and data, the runners' bridge, hub registration, datasets s3prl lacks."""
