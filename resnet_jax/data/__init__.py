"""The data layer: data sets into host memory, host batches, on-device augmentation (ARCHITECTURE.md)."""
