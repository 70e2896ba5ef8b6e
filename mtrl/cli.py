"""Shared pieces of the command-line scripts."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """Bad flags print ONE line naming the problem (argparse's default prints the whole usage block) and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")
