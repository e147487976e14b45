"""The device side of MIST: a NumPy low-rank attention adaptor (LAE), trained on summed features."""
