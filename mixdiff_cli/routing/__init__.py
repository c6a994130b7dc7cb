"""From a prompt to a route: the route value and its grammar, encoders, the gate, router checkpoints and training."""
