"""What the data pipeline and the rest of ``debater`` share, and nothing else: the training config, how text
becomes ids (``prompts``), left padding, and the command-line support with its user errors.

The layers import one way (tests/test_import_layers.py): ``debater.core`` imports no other project module;
``data_pipeline`` imports only ``debater.core`` from ``debater``; the rest of ``debater`` may import both;
``benchmarks`` may import everything. This file imports nothing, so ``import debater.core`` loads no more
than the modules it names."""
