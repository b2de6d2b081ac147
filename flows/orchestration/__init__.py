"""Prefect flows only: each stage as tasks, plus the Markdown artifacts they leave."""
