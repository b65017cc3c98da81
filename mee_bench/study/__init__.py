"""Analysis: the paper's monotonicity statistics, their driver and plots, and the model report."""
