"""The plugin contract checks and fixtures of craterlab.testing."""

pytest_plugins = ["craterlab.testing"]
