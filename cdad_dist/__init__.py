"""cdad-dist."""
