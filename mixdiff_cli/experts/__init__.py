"""Editing the catalog: init, add, remove, verify (keeps a trained router in step)."""
