"""The federated loop: clients, server optimizers, the in-process transport."""
