"""The cloud side of MIST: a frozen timm backbone writes Gather* summed features into feature sets."""
