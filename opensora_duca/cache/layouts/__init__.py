"""What the cache knows about a model family's block layout, one module per family."""
