"""Pure loss functions: tensors and scalars in, `(loss, stats)` out. No config objects, no state."""
