"""Retrieval evaluation: ground truth (datasets), AP / mAP / mP@k (metrics), runs (evaluate)."""
