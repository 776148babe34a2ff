"""Offline tasks (tasks.py) and the population root on disk (store.py)."""
