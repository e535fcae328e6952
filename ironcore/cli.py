"""Command-line entry (placeholder until the config helper lands the real one)."""


def main() -> int:
    return 0
