"""Reports: routing accuracy, expert specialisation, samples, and their figures."""
