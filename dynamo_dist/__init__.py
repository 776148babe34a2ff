"""dynamo_dist: DYNAMO model embeddings for populations of networks, at scale on Ray."""

__version__ = "0.1.0"
