"""Benchmarks behind `make bench`, run from the repository root with ``python -m benchmarks NAME [args]``.

Each benchmark is a module here with a ``main(argv: list[str] | None = None) -> int`` and a docstring whose
first line describes it; ``python -m benchmarks`` lists them. Most measure one speed ratio against the naive
way in one run; they read the embedded default under ``assets/`` and write ``runs/bench/NAME.json``
(``benchmarks/common.py``). Not part of the installed package: they need paths only the repository has."""
