"""Every picture: figure conventions, evaluation plots, a summary's frames, the drawing thread."""
