"""Measuring whether LoRA round k+1 beats round k: metrics, paired bootstrap, and the HTML report."""
