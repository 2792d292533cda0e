"""Model-side helpers: feature and embedding taps for any timm model."""
