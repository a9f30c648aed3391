"""One module per CLI verb; `reconciler.cli` wires them to argparse."""
