"""SUPERB downstream recipes: manifests, corpus layouts (synthetic and real), the superb runner and scores."""
