"""Tests of chatgate/backends (mirrors the package)."""
