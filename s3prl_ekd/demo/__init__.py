"""The paper's experiment in miniature: synthetic corpus, label-free teacher training, the pipeline."""
