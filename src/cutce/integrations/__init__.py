"""Integrations with training libraries; each imports its library lazily."""
