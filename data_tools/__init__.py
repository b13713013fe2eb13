"""Review streams -> per-window WebDataset shards and the item index (see docs/architecture.md)."""

__version__ = "0.1.0"
