"""Evaluation: FID/KID and CLIP text-alignment metrics, and ablation reports from MLflow runs."""
