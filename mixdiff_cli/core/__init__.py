"""Leaf utilities: errors, atomic files and locks, device/dtype facts, quiet frameworks. Imports nothing else of mixdiff."""
