"""Bytes in and out: object storage (local, S3, anything fsspec reads), image decoding and
encoding, and staging model weights onto a node. Nothing here knows rows, jobs or models.
See docs/architecture.md."""
