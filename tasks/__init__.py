"""Thin Prefect task wrappers around lancet_core: resolve paths, call the core, return paths (never tensors/frames)."""
