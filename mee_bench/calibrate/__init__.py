"""Learn-then-Test threshold calibration: the most aggressive exit threshold whose risk stays
within a tolerance delta of the full model's with probability at least 1 - epsilon."""
