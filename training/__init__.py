"""CIFAR-100 training: data, the shared preprocessing, models, recipes and one training loop."""
