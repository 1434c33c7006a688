"""Faces of ``SteerReward`` for training frameworks (TRL). Each module imports its framework lazily."""
