"""The built-in offline task: corpus, measurement, gold taste and simulated annotators."""
