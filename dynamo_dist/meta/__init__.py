"""The meta stage: DYNAMO in plain PyTorch (model, objective, metrics, trainer, checkpoint), its
run directory (outputs), and the Ray Train / Ray Tune wrappers (ray_train, tune); post-hoc embedding."""
