"""Results tables and plots, read from run directories and sweep tables only."""
