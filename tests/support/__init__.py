"""What the tests share: fake servers, tiny reward-model builders, hostile programs, and the helpers
that run winnow for real. Paths here are the checkout's, wherever a test module sits."""

from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
DATA = TESTS / "data"
PLUGINS = TESTS / "plugins"
