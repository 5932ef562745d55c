"""The recipe comparison on the synthetic verifiable tasks: ``python -m wmtp_train.experiment``."""
