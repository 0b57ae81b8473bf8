"""CLI sub-command modules; each exposes ``register(subparsers)``. See sft_core/cli.py."""
