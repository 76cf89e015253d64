"""The command line (`llmpareto ...`): argparse and printing, one module per verb family; the
logic behind each verb is callable from Python (`llmpareto.search`, `llmpareto.pick`, ...)."""

from llmpareto.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
