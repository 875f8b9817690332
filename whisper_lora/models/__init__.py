"""Base models: where they come from and how they are loaded."""
