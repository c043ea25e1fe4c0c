"""Small reference models that run their attention through tilegraph."""
