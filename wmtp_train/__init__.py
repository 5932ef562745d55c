"""WMTP trainer: MTP Llama with a value head, verified code data, recipes, FSDP2, checkpoints, MLflow."""
