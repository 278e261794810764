"""The vLLM side: plugin registration, the model loader, vLLM API adapter, rank identity, result line, serving after load."""
