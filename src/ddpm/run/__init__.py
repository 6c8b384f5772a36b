"""The run layer: what a run is (its configuration and the one preset table) and how a trained one
is loaded back (docs/LAYERS.md)."""
