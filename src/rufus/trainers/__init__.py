"""One file per algorithm: its config dataclass at the top, then `train_<algo>(config) -> result`."""
