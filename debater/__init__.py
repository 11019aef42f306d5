"""DEBATER dense retrieval. The public Python API is ``Retriever`` (see debater/retriever.py); it is imported on
first use, so ``import debater.core`` and the command line start without loading torch for it."""


def __getattr__(name: str):
    if name == "Retriever":
        from debater.retriever import Retriever

        return Retriever
    raise AttributeError(f"module 'debater' has no attribute {name!r}")


__all__ = ["Retriever"]
