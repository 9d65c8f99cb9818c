"""securefed: privacy-preserving federated fine-tuning of language models.

Subpackages:

* :mod:`securefed.fl`: the federated loop (server, clients, transport, server optimizers).
* :mod:`securefed.peft`: the PEFT method registry (LoRA, ...) and ``AdapterSpec``.
* :mod:`securefed.assets`: the embedded model and data sets (offline).
* :mod:`securefed.protocols`: secure aggregation (installed from ``protocols/``).
* :mod:`securefed.attacks`: threat models and attacks (installed from ``attacks/``).
"""

__version__ = "0.1.0"
