"""The built-in architecture families (``dynamo_dist.family`` is their interface and registry): one
module a family, each registering itself when the registry first loads it."""
