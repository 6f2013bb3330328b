"""`python -m safekey_trl ...` runs the CLI, so that `accelerate launch -m safekey_trl train ...` works."""

from .cli import app

app()
