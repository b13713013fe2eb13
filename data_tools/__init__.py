"""Review streams -> per-window WebDataset shards and the item index (see DESIGN.md)."""

__version__ = "0.1.0"
