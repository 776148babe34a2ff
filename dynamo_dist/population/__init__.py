"""The population stage: plain training + recording (train.py), users' models (user_models.py), Ray actors (actors.py)."""
