"""The MTP Llama with a value head: arguments, layers, the model, and Meta checkpoint I/O."""
