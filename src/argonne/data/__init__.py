"""Training data, one module per step of the flow:

    settings.py    DataError; DocumentSettings (defined in argonne_options): what prepare and streaming read
    parquet.py     finding parquet files (local, globs, hf://) and reading their text column
    documents.py   quality filters, the validation split, tokenizing row groups in worker processes
    prepare.py     `argonne data prepare`: token shards and a manifest; PreparedTokens reads them back
    streaming.py   the same tokens straight from parquet, tokenization shared across a run's processes
    batches.py     windows, the global sample order, resumable batches (pretraining and SFT), validation windows
    sft.py         instruction data: conversations, assistant-only labels, packed windows

Each module imports only those above it. This file stays light (run_config.py and the command line's help import the
settings): import what you use from its module.
"""

from .settings import DataError, DocumentSettings

__all__ = ["DataError", "DocumentSettings"]
