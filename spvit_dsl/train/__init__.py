"""Stage — train: fine-tuning, evaluation and the end-to-end recipe of compact networks."""
