"""Offline preparation: dataset builders and weight conversion."""
