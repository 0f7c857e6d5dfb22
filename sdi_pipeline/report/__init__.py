"""What people look at: the printed summary, plots and Weights & Biases logging."""
