"""The base model: pipeline loading and text encoding."""
