"""What a candidate is trained on and how: one proxy training, the base weights it inherits, dataset checks and
the built-in generated datasets."""
